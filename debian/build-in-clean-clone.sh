#!/usr/bin/env bash
# Build memwatchd_<version>_<arch>.deb the way a user would: a clean clone of the
# committed tree, build dependencies from debian/control (apt-get build-dep ./),
# dpkg-buildpackage -us -uc -b with Debian's own python3 and cython3 (no pyenv or
# venv on PATH), then lintian, which must report no error.
#   debian/build-in-clean-clone.sh OUT_DIR    (as root, on Debian 12 or later)
# Leaves OUT_DIR/memwatchd_*.deb, the .changes, lintian.txt, and OUT_DIR/tree: the
# unpacked package, for running the test suite against it.
set -euo pipefail
out=$(realpath -m "${1:?usage: $0 OUT_DIR}")
src=$(cd "$(dirname "$0")/.." && pwd)
export DEBIAN_FRONTEND=noninteractive PATH=/usr/sbin:/usr/bin:/sbin:/bin
rm -rf "$out" && mkdir -p "$out"
git clone -q --no-hardlinks "$src" "$out/src"
cd "$out/src"
apt-get build-dep -y -qq --no-install-recommends ./ >"$out/build-dep.log" 2>&1 ||
    { cat "$out/build-dep.log"; exit 1; }
dpkg-buildpackage -us -uc -b >"$out/build.log" 2>&1 || { tail -50 "$out/build.log"; exit 1; }
cd "$out"
rm -rf src
command -v lintian >/dev/null || apt-get install -y -qq --no-install-recommends lintian >/dev/null
lintian -I --pedantic --fail-on error ./memwatchd_*.changes >lintian.txt 2>&1 || { cat lintian.txt; exit 1; }
sed -i '/running with root privileges/d' lintian.txt
echo "lintian (no errors; tags below are justified in the Debian packaging notes):"
cat lintian.txt
dpkg-deb -x memwatchd_*_"$(dpkg --print-architecture)".deb tree
ls -l "$out"/*.deb
