"""A quick matrix of POSIX checks on any directory, as root and as another uid.

    python -m tools.posixcheck DIR [--uid 65534] [--gid 65533] [-v]

It covers the groups of issue 12 (file types, hard links, ctime, permission rules for
other users, name limits) for every file type, so progress can be measured in seconds
on a mount (``--allow-other`` is needed for the other-uid checks). Run it on ext4 or tmpfs
first: every check passes there. Exit status 0 only if all checks pass.

Checks that need another uid run in a forked child that drops to ``--uid``/``--gid``
(with ``--gid`` and ``--gid2`` as its groups); results come back as errno values.
"""

from __future__ import annotations

import argparse
import errno
import os
import socket
import stat
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

TYPES = ("regular", "dir", "fifo", "block", "char", "socket", "symlink")
GROUPS = ("types", "ctime", "perms", "names", "fifo", "unlinked")
NAP = 1.05  # ctime checks compare whole seconds, as the conformance suites do


@dataclass
class Results:
    verbose: bool = False
    passed: int = 0
    failed: list[str] = field(default_factory=list)

    def check(self, what: str, ok: bool, detail: object = "") -> None:
        if ok:
            self.passed += 1
        else:
            self.failed.append(f"{what}: {detail}")
        if self.verbose or not ok:
            print(f"{'ok  ' if ok else 'FAIL'} {what} {detail if not ok else ''}", flush=True)


def make(kind: str, path: Path, mode: int = 0o644) -> None:
    if kind == "regular":
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode))
    elif kind == "dir":
        os.mkdir(path, mode)
    elif kind == "fifo":
        os.mkfifo(path, mode)
    elif kind == "block":
        os.mknod(path, stat.S_IFBLK | mode, os.makedev(4, 5))
    elif kind == "char":
        os.mknod(path, stat.S_IFCHR | mode, os.makedev(1, 3))
    elif kind == "socket":
        sock = socket.socket(socket.AF_UNIX)
        try:
            sock.bind(str(path))
        finally:
            sock.close()
        os.chmod(path, mode)
    else:
        os.symlink("target", path)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        os.rmdir(path)
    else:
        os.unlink(path)


def type_of(mode: int) -> str:
    return {
        stat.S_IFREG: "regular", stat.S_IFDIR: "dir", stat.S_IFIFO: "fifo", stat.S_IFBLK: "block",
        stat.S_IFCHR: "char", stat.S_IFSOCK: "socket", stat.S_IFLNK: "symlink",
    }.get(stat.S_IFMT(mode), "?")  # fmt: skip


def as_user(uid: int, gids: tuple[int, ...], fn: Callable[[], object]) -> int:
    """Run ``fn`` in a child with the given ids; its errno (0 on success)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            os.close(read_end)
            os.setgroups(list(gids))
            os.setgid(gids[0])
            os.setuid(uid)
            fn()
        except OSError as exc:
            code = exc.errno or 255
        except BaseException:
            code = 255
        os.write(write_end, code.to_bytes(2, "big"))
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        raw = reader.read()
    os.waitpid(pid, 0)
    return int.from_bytes(raw, "big") if raw else 255


def code_of(fn: Callable[..., object], *args: object) -> int:
    """The errno of ``fn(*args)``, 0 on success (arguments bound now, not when a loop moved on)."""
    try:
        fn(*args)
    except OSError as exc:
        return exc.errno or 255
    return 0


class Checker:
    def __init__(self, root: Path, uid: int, gid: int, gid2: int, results: Results) -> None:
        self.root, self.uid, self.gids, self.r = root, uid, (gid, gid2), results
        self.counter = 0

    def name(self) -> Path:
        self.counter += 1
        return self.root / f"pc{os.getpid()}_{self.counter}"

    @contextmanager
    def scratch(self, mode: int = 0o755) -> Iterator[Path]:
        directory = self.name()
        os.mkdir(directory)
        os.chmod(directory, mode)
        try:
            yield directory
        finally:
            for dirpath, dirnames, filenames in os.walk(directory, topdown=False):
                for entry in filenames + dirnames:
                    remove(Path(dirpath, entry))
            os.rmdir(directory)

    def other(self, fn: Callable[[], object]) -> int:
        return as_user(self.uid, self.gids, fn)

    # -- groups -----------------------------------------------------------------------------

    def types_and_links(self) -> None:
        with self.scratch() as d:
            for kind in TYPES:
                a, b, c = d / f"{kind}.a", d / f"{kind}.b", d / f"{kind}.c"
                make(kind, a)
                st = os.lstat(a)
                self.r.check(
                    f"{kind}: created with its type", type_of(st.st_mode) == kind, type_of(st.st_mode)
                )
                if kind in ("block", "char"):
                    want = os.makedev(4, 5) if kind == "block" else os.makedev(1, 3)
                    self.r.check(f"{kind}: rdev kept", st.st_rdev == want, st.st_rdev)
                if kind != "symlink":
                    self.r.check(f"{kind}: mode 0644/0755", stat.S_IMODE(st.st_mode) in (0o644, 0o755))
                os.rename(a, b)
                moved = os.lstat(b)
                self.r.check(f"{kind}: rename keeps inode", moved.st_ino == st.st_ino)
                self.r.check(f"{kind}: old name gone", code_of(os.lstat, a) == errno.ENOENT)
                if kind == "dir":
                    code = code_of(os.link, b, c)
                    self.r.check("dir: link refused with EPERM", code == errno.EPERM, code)
                    os.rmdir(b)
                    continue
                os.link(b, c, follow_symlinks=False)
                self.r.check(f"{kind}: nlink 2 after link", os.lstat(b).st_nlink == 2 == os.lstat(c).st_nlink)
                self.r.check(f"{kind}: link shares inode", os.lstat(c).st_ino == st.st_ino)
                if kind != "symlink":
                    os.chmod(c, 0o601)
                    os.chown(c, 65534, 65533)
                    seen = os.lstat(b)
                    self.r.check(
                        f"{kind}: chmod/chown via one link shows via the other",
                        (stat.S_IMODE(seen.st_mode), seen.st_uid, seen.st_gid) == (0o601, 65534, 65533),
                        (oct(seen.st_mode), seen.st_uid, seen.st_gid),
                    )
                if kind == "regular":
                    c.write_bytes(b"through c")
                    self.r.check(
                        "regular: write via one link reads via the other", b.read_bytes() == b"through c"
                    )
                os.rename(c, a)  # renaming an extra link
                self.r.check(f"{kind}: renamed link keeps nlink", os.lstat(a).st_nlink == 2)
                os.unlink(b)
                left = os.lstat(a)
                self.r.check(
                    f"{kind}: unlink keeps the other name", left.st_nlink == 1 and left.st_ino == st.st_ino
                )
                self.r.check(f"{kind}: unlinked name gone", code_of(os.lstat, b) == errno.ENOENT)
                os.unlink(a)
            os.mkdir(d / "p1")
            os.mkdir(d / "p2")
            os.mkdir(d / "p1" / "child")
            counts = (os.lstat(d / "p1").st_nlink, os.lstat(d / "p2").st_nlink)
            self.r.check("directory nlink counts subdirectories", counts == (3, 2), counts)
            os.rename(d / "p1" / "child", d / "p2" / "moved")
            counts = (os.lstat(d / "p1").st_nlink, os.lstat(d / "p2").st_nlink)
            self.r.check("rename of a directory moves its .. link", counts == (2, 3), counts)
            same = os.lstat(d / "p2" / "moved" / "..").st_ino == os.lstat(d / "p2").st_ino
            self.r.check("renamed directory's .. is its new parent", same)
            os.rmdir(d / "p2" / "moved")
            self.r.check("rmdir drops the parent's nlink", os.lstat(d / "p2").st_nlink == 2)
            os.rmdir(d / "p1")
            os.rmdir(d / "p2")
            for kind in TYPES:  # rename over every kind of existing non-directory
                if kind == "dir":
                    continue
                for victim in ("regular", "fifo", "socket", "symlink"):
                    src, dst = d / f"s.{kind}", d / f"t.{victim}"
                    make(kind, src)
                    make(victim, dst)
                    ino = os.lstat(src).st_ino
                    os.rename(src, dst)
                    self.r.check(f"rename {kind} over {victim}", os.lstat(dst).st_ino == ino)
                    os.unlink(dst)

    def ctimes(self) -> None:
        with self.scratch() as d:
            for kind in TYPES:
                path = d / f"c.{kind}"
                make(kind, path)
                renamed, extra = path.with_name(path.name + "x"), path.with_name("l")
                steps: list[tuple[str, Callable[..., object], tuple[object, ...], Path]] = [
                    ("chown", os.lchown, (path, 65534, -1), path),
                    ("rename", os.rename, (path, renamed), renamed),
                ]
                if kind != "symlink":
                    steps.insert(0, ("chmod", os.chmod, (path, 0o640), path))
                if kind not in ("dir", "symlink"):
                    steps.append(("link", os.link, (renamed, extra), renamed))
                for what, fn, args, after_path in steps:
                    before = os.lstat(path if what != "link" else renamed).st_ctime
                    time.sleep(NAP)
                    fn(*args)
                    self.r.check(f"{kind}: {what} changes ctime", os.lstat(after_path).st_ctime > before)
                if kind not in ("dir", "symlink"):
                    os.unlink(extra)
                remove(renamed)
            # unsuccessful ops change nothing
            path = d / "denied"
            make("regular", path)
            before = os.lstat(path).st_ctime
            time.sleep(NAP)
            code = self.other(lambda: os.chmod(path, 0o600))
            self.r.check("chmod by non-owner is EPERM", code == errno.EPERM, errno.errorcode.get(code))
            self.r.check("failed chmod keeps ctime", os.lstat(path).st_ctime == before)

            def times_change(what: str, subject: Path, fn: Callable[..., object], *args: object) -> None:
                first = os.lstat(subject)
                time.sleep(NAP)
                fn(*args)
                then = os.lstat(subject)
                changed = then.st_mtime > first.st_mtime and then.st_ctime > first.st_ctime
                self.r.check(f"{what} changes mtime and ctime", changed)

            def write_open() -> None:
                fd = os.open(path, os.O_WRONLY)
                try:
                    os.write(fd, b"data")
                    self.r.check("write shows in fstat at once", os.fstat(fd).st_size == 4)
                finally:
                    os.close(fd)

            times_change("write", path, write_open)
            times_change("truncate", path, os.truncate, path, 1)
            times_change("open(O_TRUNC)", path, lambda: os.close(os.open(path, os.O_WRONLY | os.O_TRUNC)))
            times_change("directory: create", d, make, "regular", d / "new")
            times_change("directory: rename", d, os.rename, d / "new", d / "new2")
            times_change("directory: unlink", d, os.unlink, d / "new2")
            times_change("directory: mkdir", d, os.mkdir, d / "sub")
            times_change("directory: rmdir", d, os.rmdir, d / "sub")
            # utimensat
            os.utime(path, ns=(1_000_000_123, 2_000_000_456))
            st = os.lstat(path)
            self.r.check(
                "utimensat keeps nanoseconds",
                (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_123, 2_000_000_456),
            )
            os.utime(path)
            st = os.lstat(path)
            self.r.check("utimensat UTIME_NOW", abs(st.st_mtime - time.time()) < 5)

    def permissions(self) -> None:
        other = self.uid
        with self.scratch(0o1777) as d:
            mine, theirs = d / "root-owned", d / "their"
            make("regular", mine, 0o666)
            code = self.other(lambda: os.unlink(mine))
            self.r.check("sticky: other user cannot unlink", code == errno.EPERM, errno.errorcode.get(code))
            code = self.other(lambda: os.rename(mine, d / "moved"))
            self.r.check("sticky: other user cannot rename", code == errno.EPERM, errno.errorcode.get(code))
            self.r.check("sticky: other user may create", self.other(lambda: make("regular", theirs)) == 0)
            self.r.check("sticky: owner may unlink", self.other(lambda: os.unlink(theirs)) == 0)
            make("regular", theirs)
            os.chown(theirs, self.uid, self.gids[0])
            code = self.other(lambda: os.rename(theirs, mine))
            self.r.check(
                "sticky: cannot rename over another's file", code == errno.EPERM, errno.errorcode.get(code)
            )
            os.mkdir(d / "subdir")
            code = self.other(lambda: os.rmdir(d / "subdir"))
            self.r.check("sticky: other user cannot rmdir", code == errno.EPERM, errno.errorcode.get(code))
        with self.scratch(0o1777) as d:
            os.chown(d, self.uid, self.gids[0])
            make("regular", d / "root-owned")
            code = self.other(lambda: os.unlink(d / "root-owned"))
            self.r.check("sticky: the directory's owner may unlink", code == 0, errno.errorcode.get(code))
        with self.scratch(0o777) as d:
            path = d / "owned"
            make("regular", path, 0o644)
            os.chown(path, other, self.gids[0])
            code = self.other(lambda: os.chown(path, 0, -1))
            self.r.check("owner cannot give a file away", code == errno.EPERM, errno.errorcode.get(code))
            code = self.other(lambda: os.chown(path, -1, self.gids[1]))
            self.r.check(
                "owner may chgrp to own group", code == 0 and os.lstat(path).st_gid == self.gids[1], code
            )
            code = self.other(lambda: os.chown(path, -1, 0))
            self.r.check(
                "owner cannot chgrp to a foreign group", code == errno.EPERM, errno.errorcode.get(code)
            )
            os.chmod(path, 0o6777)
            os.chown(path, other, self.gids[0])
            self.r.check(
                "chown clears setuid/setgid",
                stat.S_IMODE(os.lstat(path).st_mode) & 0o6000 == 0,
                oct(os.lstat(path).st_mode),
            )
            os.chown(path, 0, 0)
            os.chmod(path, 0o4777)
            code = self.other(lambda: path.write_bytes(b"x"))
            self.r.check(
                "write by another user clears setuid",
                code == 0 and not os.lstat(path).st_mode & 0o4000,
                (code, oct(os.lstat(path).st_mode)),
            )
            os.chmod(path, 0o600)
            self.r.check("open denied for other", self.other(lambda: path.read_bytes()) == errno.EACCES)
            os.chmod(path, 0o444)
            code = self.other(lambda: os.open(path, os.O_WRONLY))
            self.r.check(
                "write-open of read-only file denied", code == errno.EACCES, errno.errorcode.get(code)
            )
            code = self.other(lambda: os.utime(path, (1, 1)))
            self.r.check(
                "utimes with explicit times by non-owner", code == errno.EPERM, errno.errorcode.get(code)
            )
            os.chmod(path, 0o666)
            self.r.check("utimes(NULL) by writer allowed", self.other(lambda: os.utime(path)) == 0)
            sgid = d / "sgid"
            os.mkdir(sgid)
            os.chown(sgid, 0, self.gids[1])
            os.chmod(sgid, 0o2777)
            make("regular", sgid / "f")
            os.mkdir(sgid / "sub")
            self.r.check("setgid dir: new file takes its group", os.lstat(sgid / "f").st_gid == self.gids[1])
            self.r.check(
                "setgid dir: new dir keeps the bit", bool(os.lstat(sgid / "sub").st_mode & stat.S_ISGID)
            )

    def names(self) -> None:
        with self.scratch() as d:
            ok, long = "n" * 255, "n" * 256
            make("regular", d / ok)
            self.r.check("255-byte name works", os.lstat(d / ok).st_size == 0)
            for what, op in (
                ("create", lambda: make("regular", d / long)),
                ("mkdir", lambda: os.mkdir(d / long)),
                ("lstat", lambda: os.lstat(d / long)),
                ("unlink", lambda: os.unlink(d / long)),
                ("rename", lambda: os.rename(d / ok, d / long)),
                ("link", lambda: os.link(d / ok, d / long)),
                ("mkfifo", lambda: os.mkfifo(d / long)),
            ):
                code = code_of(op)
                self.r.check(
                    f"{what}: 256-byte name is ENAMETOOLONG",
                    code == errno.ENAMETOOLONG,
                    errno.errorcode.get(code),
                )

    def unlinked_while_open(self) -> None:
        with self.scratch() as d:
            path = d / "open"
            fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                os.write(fd, b"still here")
                os.unlink(path)
                st = os.fstat(fd)
                self.r.check("fstat of an unlinked open file: nlink 0", st.st_nlink == 0, st.st_nlink)
                self.r.check("an unlinked open file stays readable", os.pread(fd, 10, 0) == b"still here")
                os.write(fd, b"!")
                self.r.check("and writable", os.fstat(fd).st_size == 11)
            finally:
                os.close(fd)
            self.r.check("gone after the last close", code_of(os.lstat, path) == errno.ENOENT)

    def fifo_works(self) -> None:
        with self.scratch() as d:
            path = d / "pipe"
            os.mkfifo(path)
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the writer
                with open(path, "wb") as writer:
                    writer.write(b"through the pipe")
                os._exit(0)
            with open(path, "rb") as reader:
                data = reader.read()
            os.waitpid(pid, 0)
            self.r.check("a FIFO is a working pipe", data == b"through the pipe", data)
            sock = socket.socket(socket.AF_UNIX)
            sock.bind(str(d / "s"))
            sock.listen(1)
            client = socket.socket(socket.AF_UNIX)
            client.connect(str(d / "s"))
            peer, _ = sock.accept()
            client.sendall(b"hello")
            self.r.check("a socket bound in the mount connects", peer.recv(5) == b"hello")
            for s in (peer, client, sock):
                s.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--uid", type=int, default=65534)
    parser.add_argument("--gid", type=int, default=65534)
    parser.add_argument("--gid2", type=int, default=65533)
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--only", choices=GROUPS, action="append")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("run as root: the checks switch to other uids")
    results = Results(verbose=args.verbose)
    checker = Checker(args.directory, args.uid, args.gid, args.gid2, results)
    groups = {
        "types": checker.types_and_links, "ctime": checker.ctimes, "perms": checker.permissions,
        "names": checker.names, "fifo": checker.fifo_works, "unlinked": checker.unlinked_while_open,
    }  # fmt: skip
    old_umask = os.umask(0o022)
    try:
        for name in args.only or list(groups):
            try:
                groups[name]()
            except OSError as exc:
                results.check(f"{name}: group ran to the end", False, repr(exc))
    finally:
        os.umask(old_umask)
    total = results.passed + len(results.failed)
    print(f"{results.passed}/{total} checks passed")
    return 0 if not results.failed else 1


if __name__ == "__main__":
    sys.exit(main())
