#!/usr/bin/env bash
# Build a tiny busybox initramfs: it mounts the host root read-only (9p) under a tmpfs overlay and
# switch_roots into guest/stage2.sh on the host filesystem (path passed as vmlab.stage2=).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/env.sh"
KVER=$(ls "$KDIR/lib/modules")
W=$(mktemp -d "$VM_STATE/.initrd.XXXXXX")
trap 'rm -rf "$W"' EXIT
mkdir -p "$W"/{bin,dev,proc,sys,lower,rw,newroot,mods}
cp /bin/busybox "$W/bin/busybox"           # from busybox-static
# modules needed to mount the root: virtio-pci transport, 9p, overlay (deps resolved by host kmod)
for m in virtio_pci 9pnet_virtio 9p overlay; do
  modprobe -d "$KDIR" -S "$KVER" --show-depends "$m"
done | awk '$1=="insmod"{print $2}' | awk '!seen[$0]++' > "$W/order.full"
while read -r f; do cp "$f" "$W/mods/"; basename "$f"; done < "$W/order.full" > "$W/mods/order"
rm "$W/order.full"
cp "$HERE/guest/init" "$W/init"; chmod +x "$W/init"
(cd "$W" && find . | cpio -o -H newc --quiet) > "$VM_STATE/initramfs.cpio.tmp"
mv "$VM_STATE/initramfs.cpio.tmp" "$VM_STATE/initramfs.cpio"
echo "vm: built initramfs ($(du -h "$VM_STATE/initramfs.cpio" | cut -f1)); modules: $(tr '\n' ' ' < "$W/mods/order")"
