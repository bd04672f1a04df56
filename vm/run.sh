#!/usr/bin/env bash
# Run one shell command inside a throw-away VM booted from the stock Debian kernel, with the host's /
# shared read-only over 9p (tmpfs overlay on top in the guest) and dm_thin_pool loaded.
#
# Usage: vm/run.sh [-m MEM] [-c CPUS] [-C GUEST_CWD] [--out DIR] [--disk SIZE] -- 'shell command'
# The exit status is the guest command's (125 if the guest never reported one).
# --out DIR is shared read-write at the same path in the guest (results, logs).
# --disk SIZE attaches a fresh ext4 disk of SIZE (a sparse image on the host's disk, virtio-blk,
#   no host page cache: the guest's flushes reach the host's disk) mounted at /disk in the guest,
#   with CSI_THIN_VM_DISK=/disk set: for what must not sit on tmpfs (fsync costs). Deleted after.
# Env: VM_TIMEOUT (seconds, default 2400), VM_ACCEL (kvm|tcg: skip the probe),
#      VM_ENV (names of host variables to pass into the guest, space separated).
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/env.sh"
[ -f "$KDIR/vmlinux" ] && [ -f "$VM_STATE/initramfs.cpio" ] || { echo "vm: not set up; run 'make vm-setup'" >&2; exit 125; }
MEM=3G CPUS=$(nproc) CWD=$PWD OUT= DISK=
while [ $# -gt 0 ]; do case $1 in
  -m) MEM=$2; shift 2;; -c) CPUS=$2; shift 2;; -C) CWD=$2; shift 2;; --out) OUT=$2; shift 2;; --disk) DISK=$2; shift 2;;
  --) shift; break;; *) break;; esac; done
[ $# -gt 0 ] || { echo "usage: vm/run.sh [-m MEM] [-c CPUS] [-C CWD] [--out DIR] [--disk SIZE] -- command" >&2; exit 2; }

boot() {  # boot(accel, timeout, command...) -> guest exit code
  local accel=$1 tmo=$2; shift 2
  local run; mkdir -p "$VM_STATE/run"; run=$(mktemp -d "$VM_STATE/run/r.XXXXXX")
  printf '%s\n' "$*" > "$run/cmd"; echo "$CWD" > "$run/cwd"; : > "$run/env"
  # the guest learns how it is run: emulated (tcg) timings are not the machine's (bench/scale.py)
  printf 'CSI_THIN_VM_ACCEL=%s\n' "$accel" > "$run/env"
  for v in ${VM_ENV:-}; do [ -n "${!v+x}" ] && printf '%s=%q\n' "$v" "${!v}" >> "$run/env"; done
  local acc
  case $accel in
    kvm) acc=(-accel kvm -cpu host);;
    # no ERMS/FSRM: rep movsb/stosb is ~5x slower under TCG
    tcg) acc=(-accel tcg,thread=multi,tb-size=256 -cpu max,-erms,-fsrm);;
  esac
  local out=() disk=() disk_arg=
  [ -n "$OUT" ] && { mkdir -p "$OUT"; out=(-fsdev "local,id=hostout,path=$OUT,security_model=none" -device virtio-9p-pci,fsdev=hostout,mount_tag=hostout); }
  if [ -n "$DISK" ]; then
    # formatted here (fast, native) with every inode table written, so no lazy-init thread writes
    # in the guest behind what it measures
    truncate -s "$DISK" "$run/disk.img" &&
      mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 "$run/disk.img" ||
      { echo "vm: cannot make the $DISK disk image" >&2; rm -rf "$run"; return 125; }
    disk=(-drive "file=$run/disk.img,if=virtio,format=raw,cache=none,aio=threads")
    disk_arg=" vmlab.disk=/disk"
  fi
  timeout --kill-after=5 "$tmo" qemu-system-x86_64 -M pc "${acc[@]}" -m "$MEM" -smp "$CPUS" \
    -nodefaults -no-user-config -display none -no-reboot \
    -chardev stdio,id=con,signal=off -serial chardev:con \
    -kernel "$KDIR/vmlinux" -initrd "$VM_STATE/initramfs.cpio" \
    -append "console=ttyS0 quiet loglevel=1 panic=-1 rdinit=/init vmlab.run=$run vmlab.kdir=$KDIR vmlab.stage2=$HERE/guest/stage2.sh vmlab.out=$OUT$disk_arg" \
    -fsdev local,id=hostroot,path=/,readonly=on,security_model=none,multidevs=remap \
    -device virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot \
    -fsdev "local,id=hostrun,path=$run,security_model=none" -device virtio-9p-pci,fsdev=hostrun,mount_tag=hostrun \
    "${out[@]}" "${disk[@]}" </dev/null
  local qrc=$? rc=125
  [ -f "$run/rc" ] && rc=$(cat "$run/rc") || echo "vm: guest did not report an exit code (qemu rc=$qrc)" >&2
  rm -rf "$run"
  return "$rc"
}

# KVM first, TCG when KVM cannot boot this kernel (on a PVM host it fails). The verdict is cached
# per kernel package and qemu version, so the probe costs one short boot per machine.
accel=${VM_ACCEL:-}
if [ -z "$accel" ]; then
  key="$(cat "$VM_STATE/kernel.pkg" 2>/dev/null) $(qemu-system-x86_64 --version | head -1)"
  if [ -f "$VM_STATE/accel" ] && [ "$(sed -n 2p "$VM_STATE/accel")" = "$key" ]; then
    accel=$(sed -n 1p "$VM_STATE/accel")
  else
    accel=tcg
    if [ -w /dev/kvm ]; then
      echo "vm: probing KVM ..." >&2
      boot kvm 30 true >/dev/null 2>&1 && accel=kvm
    fi
    printf '%s\n%s\n' "$accel" "$key" > "$VM_STATE/accel"
  fi
fi
t0=$(date +%s.%N)
echo "vm: booting $(cat "$VM_STATE/kernel.pkg") accel=$accel mem=$MEM cpus=$CPUS" >&2
boot "$accel" "${VM_TIMEOUT:-2400}" "$@"
rc=$?
echo "vm: wall $(echo "$(date +%s.%N) - $t0" | bc | cut -c1-6)s, exit $rc" >&2
exit "$rc"
