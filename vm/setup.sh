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
# The initramfs depends on the unpacked kernel and on our init script: rebuild it when either changes
# (content hashes, not mtimes: a fresh clone has new mtimes).
initrd_key() { cat "$VM_STATE/kernel.pkg" "$HERE/guest/init" "$HERE/build-initramfs.sh" | sha256sum | cut -c1-16; }
if [ "$(cat "$VM_STATE/kernel.pkg" 2>/dev/null)" != "$PKG" ] || [ ! -f "$KDIR/vmlinux" ]; then
  ls "$VM_STATE/debs/${PKG}"_*.deb >/dev/null 2>&1 || (cd "$VM_STATE/debs" && apt-get download "$PKG")
  rm -rf "$KDIR" && mkdir -p "$KDIR"
  dpkg-deb -x "$VM_STATE"/debs/"$PKG"_*.deb "$KDIR"
  depmod -b "$KDIR" "$(ls "$KDIR/lib/modules")"
  python3 "$HERE/extract-vmlinux.py" "$KDIR/boot/vmlinuz-$(ls "$KDIR/lib/modules")" "$KDIR/vmlinux"
  echo "$PKG" > "$VM_STATE/kernel.pkg"
fi
if [ ! -f "$VM_STATE/initramfs.cpio" ] || [ "$(cat "$VM_STATE/initramfs.key" 2>/dev/null)" != "$(initrd_key)" ]; then
  "$HERE/build-initramfs.sh"
  initrd_key > "$VM_STATE/initramfs.key"
fi
KVER=$(ls "$KDIR/lib/modules")
echo "vm: ready ($PKG, KVER=$KVER)"
