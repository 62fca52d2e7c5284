#!/bin/sh
# Install the host tools the VM test tier needs (qemu, debootstrap, mkfs.ext4),
# only if they are missing. Meant for a fresh Debian 12 CI machine running as root.
set -eu

missing=""
command -v qemu-system-x86_64 >/dev/null 2>&1 || missing="$missing qemu-system-x86"
command -v debootstrap >/dev/null 2>&1 || missing="$missing debootstrap"
command -v mkfs.ext4 >/dev/null 2>&1 || missing="$missing e2fsprogs"

if [ -z "$missing" ]; then
    echo "install-deps: qemu, debootstrap and e2fsprogs already present"
    exit 0
fi

SUDO=""
if [ "$(id -u)" != 0 ]; then
    SUDO="sudo"
fi

echo "install-deps: installing:$missing"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
# --no-install-recommends keeps qemu small (no GUI/audio stacks).
# shellcheck disable=SC2086
$SUDO apt-get install -y -q --no-install-recommends $missing
