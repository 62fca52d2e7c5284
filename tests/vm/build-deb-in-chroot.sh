#!/usr/bin/env bash
# Build memwatchd's .deb for another Debian release in a debootstrap chroot.
#
#   build-deb-in-chroot.sh SUITE OUT_DIR MIRROR CHROOT_DIR
#
# A .deb built on Debian 12 depends on python3 (<< 3.12): its extension is
# compiled for one CPython ABI, so Debian 13 (Python 3.13) needs its own build.
# Building natively in a chroot is much cheaper than compiling under TCG in the
# guest: a buildd chroot (debootstrap --variant=buildd), kept in CHROOT_DIR and
# reused, gets the build dependencies from debian/control (apt-get build-dep ./)
# and builds a clean clone of HEAD with dpkg-buildpackage -us -uc -b, as on the
# host. No service starts inside (policy-rc.d exits 101). Needs root, network to
# the Debian mirror. Leaves OUT_DIR/memwatchd_*.deb and build.log.
set -euo pipefail
suite=${1:?usage: $0 SUITE OUT_DIR MIRROR CHROOT_DIR}
out=$(realpath -m "${2:?}")
mirror=${3:?}
chroot_dir=$(realpath -m "${4:?}")
src=$(cd "$(dirname "$0")/../.." && pwd)
export DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 PATH=/usr/sbin:/usr/bin:/sbin:/bin

mounted=()
cleanup() {
    for ((i=${#mounted[@]}-1; i>=0; i--)); do umount -l "${mounted[$i]}" || true; done
}
trap cleanup EXIT

if [ ! -e "$chroot_dir/.complete" ]; then
    rm -rf "$chroot_dir"
    mkdir -p "$(dirname "$chroot_dir")"
    echo "build-deb-in-chroot: debootstrap --variant=buildd $suite"
    debootstrap --variant=buildd "$suite" "$chroot_dir" "$mirror" \
        > "$chroot_dir.debootstrap.log" 2>&1 || { tail -30 "$chroot_dir.debootstrap.log"; exit 1; }
    printf '#!/bin/sh\nexit 101\n' > "$chroot_dir/usr/sbin/policy-rc.d"
    chmod +x "$chroot_dir/usr/sbin/policy-rc.d"
    touch "$chroot_dir/.complete"
fi
cp /etc/resolv.conf "$chroot_dir/etc/resolv.conf" 2>/dev/null || true
mount -t proc proc "$chroot_dir/proc" && mounted+=("$chroot_dir/proc")

rm -rf "$chroot_dir/build" && mkdir -p "$chroot_dir/build"
git clone -q --no-hardlinks "$src" "$chroot_dir/build/memwatchd"
in_chroot() { chroot "$chroot_dir" /usr/bin/env HOME=/root "$@"; }
mkdir -p "$out"
{
    in_chroot apt-get update -qq
    in_chroot sh -c 'cd /build/memwatchd && apt-get build-dep -y -qq --no-install-recommends ./'
    in_chroot sh -c 'cd /build/memwatchd && dpkg-buildpackage -us -uc -b'
} > "$out/build.log" 2>&1 || { tail -50 "$out/build.log"; exit 1; }
# lintian runs on the Debian 12 build (debian/build-in-clean-clone.sh); here it would
# add ~60 Perl packages to every cold chroot. MEMWATCHD_CHROOT_LINTIAN=1 runs it.
if [ "${MEMWATCHD_CHROOT_LINTIAN:-0}" = 1 ]; then
    in_chroot apt-get install -y -qq --no-install-recommends lintian >> "$out/build.log" 2>&1
    in_chroot sh -c 'cd /build && lintian -I --pedantic --fail-on error ./memwatchd_*.changes' \
        > "$out/lintian.txt" 2>&1 || { cat "$out/lintian.txt"; exit 1; }
    sed -i '/running with root privileges/d' "$out/lintian.txt"
    cat "$out/lintian.txt"
fi
cp "$chroot_dir"/build/memwatchd_*.deb "$chroot_dir"/build/memwatchd_*.changes "$out/"
rm -rf "$chroot_dir/build"
ls -l "$out"/*.deb
