#!/bin/sh
# Stage 2 (PID 1, host userspace via the overlay): load the storage modules, print what the tests run
# against, run $RUN/cmd once, write its exit code to $RUN/rc and power off.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM=dumb LANG=C.UTF-8
export DM_DISABLE_UDEV=1          # no udev in the guest: nothing may wait on it
export CSI_THIN_IN_VM=1
read RUN < /run/vmlab-run
# modprobe -a: without it, later names would become parameters of the first module
modprobe -a dm_mod dm_thin_pool loop ext4 xfs || echo "vm: modprobe failed"
read up _ < /proc/uptime
echo "vm: kernel $(uname -r) up ${up}s; modules: $(grep -oE '^(dm_thin_pool|dm_mod|dm_persistent_data|loop|xfs|ext4) ' /proc/modules | tr -d ' ' | tr '\n' ' ')"
# vm/run.sh --disk: a real (virtio) disk with an ext4 filesystem, for what must not sit on tmpfs
for a in $(cat /proc/cmdline); do case $a in vmlab.disk=*) DISK=${a#*=};; esac; done
if [ -n "${DISK:-}" ]; then
  modprobe virtio_blk && mkdir -p "$DISK" && mount -t ext4 /dev/vda "$DISK" \
    && export CSI_THIN_VM_DISK="$DISK" || echo "vm: disk mount failed"
fi
# cgroup2, as on a real system: runc needs it (containerd runs containers in tests/vm)
mount -t cgroup2 cgroup2 /sys/fs/cgroup || echo "vm: cgroup2 mount failed"
# the host's loop devices are not ours: start the guest with its own
mknod -m 660 /dev/loop-control c 10 237 2>/dev/null || true
if [ -f "$RUN/cwd" ]; then read cwd < "$RUN/cwd"; cd "$cwd" 2>/dev/null || cd /; fi
if [ -f "$RUN/env" ]; then set -a; . "$RUN/env"; set +a; fi
sh "$RUN/cmd" </dev/null
rc=$?
read up _ < /proc/uptime; echo "vm: exit=$rc uptime=${up}s"
echo "$rc" > "$RUN/rc"
sync
/bin/busybox poweroff -f
