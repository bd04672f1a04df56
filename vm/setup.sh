#!/usr/bin/env bash
# Prepare the VM harness state (idempotent): Debian packages for the host side, the stock Debian
# kernel unpacked into the state dir (never into the host's /boot or /lib/modules), an uncompressed
# vmlinux for fast PVH boot, and the busybox initramfs. A second run with nothing changed is ~1 s.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/env.sh"
mkdir -p "$VM_STATE/debs"
"$HERE/../scripts/apt-install.sh" qemu-system-x86 busybox-static cpio kmod dmsetup \
    thin-provisioning-tools xfsprogs e2fsprogs lvm2 bc
# Resolve the ABI package behind the meta package (e.g. linux-image-6.1.0-56-amd64); the generic
# amd64 flavour is required (cloud-amd64 has no 9p).
resolve() { apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}'; }
PKG=$(resolve)
[ -n "$PKG" ] || { apt-get update -qq; PKG=$(resolve); }
[ -n "$PKG" ] || { echo "vm: cannot resolve linux-image-amd64 (apt-get update?)" >&2; exit 1; }
if [ -f "$VM_STATE/kernel.pkg" ] && [ "$(cat "$VM_STATE/kernel.pkg")" = "$PKG" ] && [ -f "$KDIR/vmlinux" ] \
   && [ -f "$VM_STATE/initramfs.cpio" ] && [ "$VM_STATE/initramfs.cpio" -nt "$HERE/guest/init" ]; then
  echo "vm: ready ($PKG)"; exit 0
fi
ls "$VM_STATE/debs/${PKG}"_*.deb >/dev/null 2>&1 || (cd "$VM_STATE/debs" && apt-get download "$PKG")
rm -rf "$KDIR" && mkdir -p "$KDIR"
dpkg-deb -x "$VM_STATE"/debs/"$PKG"_*.deb "$KDIR"
KVER=$(ls "$KDIR/lib/modules")
depmod -b "$KDIR" "$KVER"
python3 "$HERE/extract-vmlinux.py" "$KDIR/boot/vmlinuz-$KVER" "$KDIR/vmlinux"
"$HERE/build-initramfs.sh"
echo "$PKG" > "$VM_STATE/kernel.pkg"
echo "vm: ready ($PKG, KVER=$KVER)"
