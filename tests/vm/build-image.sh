#!/bin/sh
# Build the Debian 12 (or 13) guest image for the VM test tier into OUT_DIR.
#
#   build-image.sh OUT_DIR MIRROR [SUITE]     (SUITE: bookworm, the default, or trixie)
#
# Called by harness.ensure_image(), which builds into a temp dir and renames it
# into the cache only on success. This file, guest-packages.txt and guest/* are
# the recipe: the cache key is a hash of them, so editing any of them rebuilds.
#
# Produces in OUT_DIR: rootfs.ext4 (raw ext4, root fs), vmlinuz, initrd.img,
# build-info.txt (key=value facts about the guest). Needs root, debootstrap,
# mkfs.ext4 and network access to the Debian mirror.
set -eu

OUT=$(mkdir -p "$1" && cd "$1" && pwd)
MIRROR=$2
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT="$OUT/root"
VENV=/opt/memwatchd-venv
SUITE=${3:-bookworm}

export DEBIAN_FRONTEND=noninteractive LC_ALL=C
# Keep the host's pyenv/venv out of chroot commands.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

# Whatever happens, leave nothing mounted inside the build dir (debootstrap
# mounts /proc and /sys in its target), so it can be deleted safely.
unmount_all() {
    awk -v root="$ROOT/" 'index($5 "/", root) == 1 { print $5 }' /proc/self/mountinfo \
        | sort -r | while read -r mount_point; do umount -l "$mount_point" || true; done
}
trap unmount_all EXIT

in_root() { chroot "$ROOT" "$@"; }
apt_in_root() {
    in_root apt-get -q -y -o Dpkg::Use-Pty=0 --no-install-recommends "$@"
}

step() { echo "build-image: $(date +%T) $*"; }

packages=$(grep -v '^#' "$HERE/guest-packages.txt" | grep -v '^[[:space:]]*$' | paste -sd, -)

step "debootstrap $SUITE from $MIRROR"
mkdir -p "$ROOT"
debootstrap --variant=minbase --include="$packages" "$SUITE" "$ROOT" "$MIRROR" \
    > "$OUT/debootstrap.log" 2>&1 || { tail -n 30 "$OUT/debootstrap.log"; exit 1; }

# No daemons may start inside the chroot.
printf '#!/bin/sh\nexit 101\n' > "$ROOT/usr/sbin/policy-rc.d"
chmod +x "$ROOT/usr/sbin/policy-rc.d"

echo memwatchd-vm > "$ROOT/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 memwatchd-vm\n' > "$ROOT/etc/hosts"
# Root is mounted rw by the kernel command line; no fsck (the disk is a
# throw-away qemu snapshot).
echo '/dev/vda / ext4 rw,noatime 0 0' > "$ROOT/etc/fstab"

step "kernel + small initrd"
apt_in_root install initramfs-tools
# MODULES=list: only the modules we name, for a small initrd that loads fast under TCG.
echo 'MODULES=list' > "$ROOT/etc/initramfs-tools/conf.d/memwatchd.conf"
grep -v '^#' "$HERE/guest/initramfs-modules" > "$ROOT/etc/initramfs-tools/modules"
apt_in_root install linux-image-amd64
kver=$(ls "$ROOT/lib/modules" | sort -V | tail -n 1)
cp "$ROOT/boot/vmlinuz-$kver" "$OUT/vmlinuz"
cp "$ROOT/boot/initrd.img-$kver" "$OUT/initrd.img"
# Optional uncompressed kernel for a faster PVH boot; run with the guest's own
# python so the host needs none.
cp "$HERE/extract_vmlinux.py" "$ROOT/tmp/"
if in_root python3 /tmp/extract_vmlinux.py "/boot/vmlinuz-$kver" /tmp/vmlinux; then
    mv "$ROOT/tmp/vmlinux" "$OUT/vmlinux"
fi
rm -f "$ROOT/tmp/extract_vmlinux.py"

step "python venv at $VENV"
# Created here (seconds) rather than in the guest (minutes under TCG).
in_root python3 -m venv "$VENV"
pyver=$(in_root "$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')

step "test runner unit"
install -m 0755 "$HERE/guest/vm-runner" "$ROOT/usr/local/sbin/vm-runner"
install -m 0644 "$HERE/guest/vm-runner.service" "$ROOT/etc/systemd/system/vm-runner.service"
in_root systemctl enable vm-runner.service
# Periodic maintenance only adds noise to a short-lived test guest.
in_root systemctl mask apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer \
    e2scrub_all.timer fstrim.timer
# The peers of the race (benchmarks/vm_race.py) are installed but never start on
# their own: the race starts the one it measures, every other test runs without.
in_root systemctl disable earlyoom.service systemd-oomd.service systemd-oomd.socket
# Docker likewise: only tests/vm/test_vm_containers.py starts it (with its own daemon.json).
in_root systemctl disable docker.service docker.socket containerd.service

step "trim"
apt_in_root clean
rm -rf "$ROOT"/var/lib/apt/lists/* "$ROOT"/usr/share/doc/* "$ROOT"/usr/share/man/* \
    "$ROOT"/usr/share/locale/* "$ROOT"/boot/* "$ROOT/usr/sbin/policy-rc.d" \
    "$ROOT"/vmlinuz* "$ROOT"/initrd.img*

# The guest has no sound, GPU, NIC or radio hardware: dropping those drivers
# halves the image (faster mkfs, less cache).
moddir="$ROOT/lib/modules/$kver/kernel"
rm -rf "$moddir"/sound "$moddir"/drivers/gpu "$moddir"/drivers/media \
    "$moddir"/drivers/net/wireless "$moddir"/drivers/net/ethernet "$moddir"/drivers/infiniband \
    "$moddir"/drivers/staging "$moddir"/drivers/bluetooth "$moddir"/drivers/isdn \
    "$moddir"/drivers/iio "$moddir"/net/wireless "$moddir"/net/mac80211 "$moddir"/net/bluetooth
in_root depmod -a "$kver"

step "mkfs.ext4"
used_mb=$(du -sm "$ROOT" | cut -f1)
# Sparse file: the spare room costs nothing on the host and leaves the guest
# space for test files (writes go to qemu's snapshot overlay anyway).
truncate -s "$((used_mb + 1024))M" "$OUT/rootfs.ext4"
mkfs.ext4 -q -F -L memwatchd-root -d "$ROOT" "$OUT/rootfs.ext4"
rm -rf "$ROOT"

cat > "$OUT/build-info.txt" <<INFO
kernel_version=$kver
python_version=$pyver
venv=$VENV
suite=$SUITE
content_mb=$used_mb
INFO
step "done"
