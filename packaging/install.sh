#!/bin/bash
# Install or uninstall tierfs as a system tool (what `make install` / `make uninstall` run).
#
#   packaging/install.sh install   [VAR=value ...]
#   packaging/install.sh uninstall [VAR=value ...]
#
# Variables (also taken from the environment; the Makefile passes them):
#   PREFIX   the self-contained virtualenv                    default /opt/tierfs
#   DESTDIR  staging root prepended to every installed path   default empty
#   BINDIR   where the `tierfs` link goes                     default /usr/local/bin
#   SBINDIR  where the `mount.tierfs` link goes               default /sbin
#   UNITDIR  where tierfs@.service goes                       default /usr/local/lib/systemd/system
#   PYTHON   interpreter the virtualenv is made from          default /usr/bin/python3
#            (Debian's, which the .deb depends on; not a pyenv or other private one)
#   NO_COMPILE=1  leave out .pyc files (the .deb compiles them in postinst)
#
# Why it looks like this:
# * mount(8) drops PATH before it runs a helper, and mount.fuse3 then runs `tierfs` through
#   /bin/sh, whose built-in path is /usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin;
#   mount(8) itself finds `mount.TYPE` only in /sbin (/sbin/fs.d, /sbin/fs). So the links
#   go to BINDIR=/usr/local/bin and SBINDIR=/sbin, and nothing else is needed for
#   `fuse.tierfs` (a /sbin/mount.fuse.tierfs would make mount(8) bypass mount.fuse3).
# * The virtualenv gets its own pip (ensurepip): Debian's Python refuses `pip install` into
#   the system (PEP 668), and no system pip is needed.
# * It is built from a temporary copy of the sources, not installed editable, so it keeps
#   working when the checkout moves or goes away, and no build/ directory lands in it.
# * With DESTDIR the virtualenv is made in the staging root, then its scripts' shebangs
#   and activate files are rewritten to PREFIX, where it will live.
# * The interpreter is the versioned one (/usr/bin/python3.11), so a later change of the
#   system's `python3` does not break the virtualenv's compiled extensions.
set -euo pipefail

action=${1:-}
[ $# -gt 0 ] && shift
for assignment in "$@"; do
    case $assignment in
        PREFIX=* | DESTDIR=* | BINDIR=* | SBINDIR=* | UNITDIR=* | PYTHON=* | NO_COMPILE=*)
            export "${assignment?}" ;;
        *) echo "install.sh: unknown argument '$assignment'" >&2; exit 2 ;;
    esac
done
PREFIX=${PREFIX:-/opt/tierfs}
DESTDIR=${DESTDIR:-}
BINDIR=${BINDIR:-/usr/local/bin}
SBINDIR=${SBINDIR:-/sbin}
UNITDIR=${UNITDIR:-/usr/local/lib/systemd/system}
PYTHON=${PYTHON:-/usr/bin/python3}
NO_COMPILE=${NO_COMPILE:-}
SRC=$(cd "$(dirname "$0")/.." && pwd)
MARKER=share/tierfs/installed-by-tierfs  # uninstall removes PREFIX only when this is in it
ROOT=$DESTDIR$PREFIX

die() { echo "install.sh: $*" >&2; exit 1; }

for dir in "$PREFIX" "$BINDIR" "$SBINDIR" "$UNITDIR"; do
    case $dir in /?*) ;; *) die "'$dir' must be an absolute path" ;; esac
done
case ${PREFIX%/} in
    /usr | /usr/local | /opt | /etc | /var | /bin | /sbin | /lib | /home | /root)
        die "PREFIX=$PREFIX would be a shared system directory; use a directory of its own (default /opt/tierfs)" ;;
esac

# Directories outside PREFIX that install had to create, deepest last; uninstall removes
# them again if they are empty (e.g. /usr/local/lib/systemd/system on a fresh machine).
CREATED=()
make_dir() {
    local dir=$1 missing=()
    while [ ! -d "$DESTDIR$dir" ]; do missing=("$dir" "${missing[@]}"); dir=$(dirname "$dir"); done
    install -d -m 0755 "$DESTDIR$1"
    CREATED+=("${missing[@]}")
}

# A link NAME -> TARGET, replacing an older link or copy of the same command.
link() {
    local target=$1 name=$2
    make_dir "$(dirname "$name")"
    ln -sfn "$target" "$DESTDIR$name"
}

# Remove NAME only if it is a link into PREFIX (never someone else's file).
unlink_ours() {
    local name=$DESTDIR$1
    if [ -L "$name" ]; then
        case $(readlink "$name") in "$PREFIX"/*) rm -f "$name"; echo "removed $name" ;; esac
    fi
}

do_install() {
    local version pybin
    version=$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$SRC/pyproject.toml" | head -n1)
    [ -n "$version" ] || die "no version in $SRC/pyproject.toml"
    pybin=$(command -v "$PYTHON") || die "$PYTHON not found (make deps installs python3-venv)"
    pybin=$("$pybin" -c 'import os, sys; print(os.path.realpath(sys.executable))')
    if [ -e "$ROOT" ] && [ ! -e "$ROOT/$MARKER" ]; then
        [ -z "$(ls -A "$ROOT")" ] || die "$ROOT exists and was not made by this script; not touching it"
    fi

    STAGE=$(mktemp -d "${TMPDIR:-/tmp}/tierfs-src.XXXXXX")
    trap 'rm -rf "$STAGE"' EXIT
    local stage=$STAGE
    cp "$SRC/pyproject.toml" "$SRC/README.md" "$stage/"
    cp -r "$SRC/tierfs" "$stage/"
    find "$stage" -name __pycache__ -type d -prune -exec rm -rf {} +

    echo "virtualenv $ROOT (from $pybin)"
    rm -rf "$ROOT"
    "$pybin" -m venv "$ROOT"
    "$ROOT/bin/python" -m pip install --quiet --no-compile --no-warn-script-location "$stage"
    # The installed version, not the checkout's, is what is running from now on.
    "$ROOT/bin/python" -c 'import tierfs' || die "tierfs does not import from $ROOT"

    if [ -n "$DESTDIR" ]; then  # scripts must name the final location, not the staging root
        grep -rlIF -- "$ROOT" "$ROOT/bin" "$ROOT/pyvenv.cfg" | while read -r file; do
            sed -i "s|$ROOT|$PREFIX|g" "$file"
        done
    fi
    find "$ROOT" -name __pycache__ -type d -prune -exec rm -rf {} +
    if [ -z "$NO_COMPILE" ]; then
        "$ROOT/bin/python" -m compileall -q -j 0 ${DESTDIR:+-s "$DESTDIR" -p /} "$ROOT/lib" >/dev/null
    fi

    install -d -m 0755 "$ROOT/share/tierfs"
    install -m 0644 "$SRC/packaging/systemd/tierfs.env.example" "$SRC/packaging/fstab.example" \
        "$SRC/packaging/fuse.conf.note" "$ROOT/share/tierfs/"
    install -m 0644 "$SRC/packaging/systemd/README" "$ROOT/share/tierfs/systemd.README"
    install -m 0644 "$SRC/docs/deployment.md" "$ROOT/share/tierfs/"
    link "$PREFIX/bin/tierfs" "$BINDIR/tierfs"
    link "$PREFIX/bin/mount.tierfs" "$SBINDIR/mount.tierfs"
    make_dir "$UNITDIR"
    # The unit runs the tierfs this install put in BINDIR and points at the installed docs.
    sed -e "s|/usr/local/bin/tierfs|$BINDIR/tierfs|g" \
        -e "s|file:///usr/share/doc/tierfs/|file://$PREFIX/share/tierfs/|" \
        "$SRC/packaging/systemd/tierfs@.service" \
        > "$DESTDIR$UNITDIR/tierfs@.service"
    chmod 0644 "$DESTDIR$UNITDIR/tierfs@.service"
    {
        printf 'tierfs %s\nPREFIX=%s\nBINDIR=%s\nSBINDIR=%s\nUNITDIR=%s\n' \
            "$version" "$PREFIX" "$BINDIR" "$SBINDIR" "$UNITDIR"
        for dir in "${CREATED[@]}"; do printf 'CREATED=%s\n' "$dir"; done
    } > "$ROOT/$MARKER"
    echo "installed tierfs $version: $DESTDIR$BINDIR/tierfs, $DESTDIR$SBINDIR/mount.tierfs," \
        "$DESTDIR$UNITDIR/tierfs@.service, example env file in $ROOT/share/tierfs/"
}

do_uninstall() {
    unlink_ours "$BINDIR/tierfs"
    unlink_ours "$SBINDIR/mount.tierfs"
    local unit=$DESTDIR$UNITDIR/tierfs@.service
    if [ -f "$unit" ] && grep -qF "ExecStart=$BINDIR/tierfs " "$unit"; then
        rm -f "$unit"
        echo "removed $unit"
    fi
    if [ -e "$ROOT/$MARKER" ]; then
        local created
        created=$(sed -n 's/^CREATED=//p' "$ROOT/$MARKER" | sort -r)  # deepest first
        rm -rf "$ROOT"
        echo "removed $ROOT"
        while read -r dir; do
            [ -n "$dir" ] && rmdir "$DESTDIR$dir" 2>/dev/null && echo "removed $DESTDIR$dir"
        done <<< "$created"
    elif [ -e "$ROOT" ]; then
        die "$ROOT was not made by make install (no $MARKER); not removing it"
    fi
}

case $action in
    install) do_install ;;
    uninstall) do_uninstall ;;
    *) echo "usage: $0 install|uninstall [PREFIX=...] [DESTDIR=...] [BINDIR=...] [SBINDIR=...] [UNITDIR=...]" >&2
       exit 2 ;;
esac
