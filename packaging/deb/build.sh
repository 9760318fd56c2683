#!/bin/bash
# Build tierfs_<version>_<arch>.deb with dpkg-deb (what `make deb` runs).
#
#   packaging/deb/build.sh OUTDIR
#
# The package holds what `make install` installs, staged with DESTDIR: the virtualenv in
# /opt/tierfs, /usr/bin/tierfs and /usr/sbin/mount.tierfs (links into it; Debian packages
# never ship /usr/local, and on Debian 12 /sbin is /usr/sbin), the unit template in
# /lib/systemd/system. .pyc files are not shipped: postinst compiles them and prerm removes
# them, as Debian's own Python packages do, so that a purge leaves nothing behind.
# Depends: the exact Python the virtualenv was made from (its compiled extensions are for
# that minor version) and fuse3 (fusermount3, mount.fuse3, libfuse3 for pyfuse3).
set -euo pipefail

OUT=${1:?usage: build.sh OUTDIR}
SRC=$(cd "$(dirname "$0")/../.." && pwd)
PYTHON=${PYTHON:-/usr/bin/python3}
VERSION=$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$SRC/pyproject.toml" | head -n1)
ARCH=$(dpkg --print-architecture)
PYBIN=$("$PYTHON" -c 'import os, sys; print(os.path.realpath(sys.executable))')
PYPKG=$(dpkg-query -S "$PYBIN" | head -n1 | cut -d: -f1)  # python3.11-minimal owns the binary,
PYPKG=${PYPKG%-minimal}                                    # python3.11 adds the standard library
PYVER=$(dpkg-query -W -f='${Version}' "$PYPKG")
PYUPSTREAM=${PYVER%%-*}   # 3.11.2-6+deb12u6 -> 3.11.2: any Debian revision of it will do

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
STAGE=$(mktemp -d "${TMPDIR:-/tmp}/tierfs-deb.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
ROOT=$STAGE/root

NO_COMPILE=1 "$SRC/packaging/install.sh" install DESTDIR="$ROOT" PREFIX=/opt/tierfs \
    BINDIR=/usr/bin SBINDIR=/usr/sbin UNITDIR=/lib/systemd/system PYTHON="$PYBIN"

install -d -m 0755 "$ROOT/usr/share/doc/tierfs"
cat > "$ROOT/usr/share/doc/tierfs/copyright" <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: tierfs
Comment: /opt/tierfs is a Python virtualenv holding tierfs and its dependencies from PyPI,
 each under its own license (see /opt/tierfs/lib/python*/site-packages/*.dist-info).

Files: *
License: Apache-2.0
EOF

install -d -m 0755 "$ROOT/DEBIAN"
for script in postinst prerm postrm; do
    install -m 0755 "$SRC/packaging/deb/$script" "$ROOT/DEBIAN/$script"
done
installed_kib=$(du -sk --exclude=DEBIAN "$ROOT" | cut -f1)
cat > "$ROOT/DEBIAN/control" <<EOF
Package: tierfs
Version: $VERSION
Architecture: $ARCH
Maintainer: tierfs developers <tierfs@localhost>
Installed-Size: $installed_kib
Depends: $PYPKG (>= $PYUPSTREAM), fuse3
Section: utils
Priority: optional
Description: mount an S3 bucket as POSIX files with a persistent local cache
 tierfs mounts an S3 bucket (or a prefix of it) with FUSE. File data is fetched on
 first read into a persistent chunk cache on local disk; writes are journaled locally
 and uploaded back as ordinary objects.
 .
 Installs a self-contained virtualenv in /opt/tierfs, tierfs in /usr/bin,
 mount.tierfs in /usr/sbin (fstab types fuse.tierfs and tierfs) and the
 tierfs@.service template.
EOF
(cd "$ROOT" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z | xargs -0 md5sum) \
    > "$ROOT/DEBIAN/md5sums"

DEB=$OUT/tierfs_${VERSION}_${ARCH}.deb
# gzip: xz takes minutes on 100+ MiB of Python on two cores and saves little here.
dpkg-deb --root-owner-group -Zgzip --build "$ROOT" "$DEB" >/dev/null
echo "$DEB"
