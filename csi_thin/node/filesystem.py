"""Filesystems and mounts on the node: probe, mkfs, mount, bind, unmount, grow, stats.

Every command goes through csi_thin.runner with the caller's deadline. The one rule that matters
most lives here: a device is formatted only when it is provably blank (no signature that `blkid -p`
recognises and a zeroed first MiB); a device with data is never reformatted.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence

from csi_thin import deadline as deadline_mod
from csi_thin import errors, runner

SUPPORTED = ("ext4", "xfs")
#: The smallest device mkfs accepts per filesystem: current mkfs.xfs refuses anything under 300 MB, so
#: the controller sizes xfs volumes up to it instead of letting the first stage fail.
_MIN_BYTES = {"xfs": 300 * 1024 * 1024}


#: fstrim -v: "<mount point>: 487.2 MiB (510849024 bytes) trimmed" (util-linux 2.x)
_TRIMMED = re.compile(r"\((\d+) bytes\) trimmed")


def min_bytes(fs_type: str) -> int:
    return _MIN_BYTES.get(fs_type, 0)


_PROBE_BYTES = 1024 * 1024
#: blkid exit status: 2 = nothing found
_BLKID_NOTHING = 2
#: e2fsck exit status: 0 clean, 1 errors corrected, 2 corrected + reboot; 4 and up: not corrected
_E2FSCK_UNCORRECTED = 4
#: linux/capability.h: ext4's online resize ioctl requires it
CAP_SYS_RESOURCE = 24


@dataclasses.dataclass(frozen=True)
class Usage:
    total_bytes: int
    available_bytes: int
    used_bytes: int
    total_inodes: int
    available_inodes: int
    used_inodes: int


def probe(device: str, *, deadline: deadline_mod.Deadline) -> str | None:
    """The filesystem (or other signature) type on `device`, or None when the device is blank."""
    res = runner.run(["blkid", "-p", "-o", "export", device], deadline=deadline, check=False)
    if res.returncode == _BLKID_NOTHING:
        if not _zero_head(device):
            raise errors.FailedPrecondition(
                f"{device} holds data without a recognisable filesystem: refusing to format it"
            )
        return None
    if res.returncode != 0:
        raise errors.CommandFailed(res.argv, res.returncode, res.stderr or res.stdout)
    fields = dict(line.split("=", 1) for line in res.stdout.splitlines() if "=" in line)
    found = fields.get("TYPE") or fields.get("PTTYPE")
    if not found:
        raise errors.FailedPrecondition(f"{device} holds an unidentified signature: refusing to format it")
    return found


def _zero_head(device: str) -> bool:
    with open(device, "rb") as f:
        return not any(f.read(_PROBE_BYTES))


def make(device: str, fs_type: str, *, deadline: deadline_mod.Deadline, extra: Sequence[str] = ()) -> None:
    """mkfs on a blank device; discards are skipped (a new thin device is already unmapped).
    `extra`: more mkfs arguments, before the device (the snapshotter's fs_options)."""
    if fs_type == "ext4":
        argv = [
            "mkfs.ext4",
            "-q",
            "-F",
            "-E",
            "nodiscard,lazy_itable_init=1,lazy_journal_init=1",
            *extra,
            device,
        ]
    elif fs_type == "xfs":
        argv = ["mkfs.xfs", "-q", "-K", *extra, device]
    else:
        raise errors.InvalidArgument(f"unsupported fs type {fs_type!r}")
    try:
        runner.run(argv, deadline=deadline)
    except errors.CommandTimeout:
        # killed part-way on a device `probe` had just proven blank (the caller holds the volume's
        # claim, so everything on it now is this mkfs's): no signature yet, but not a zero head
        # either, which every later stage would take for unknown data and refuse to format
        _zero_out_head(device)
        raise


def remove_lost_found(device: str, *, deadline: deadline_mod.Deadline) -> None:
    """Remove the empty lost+found mkfs.ext4 makes, without mounting (debugfs): a container image
    layer's root holds only what the image put there (containerd's snapshotter suite compares it
    file for file, and its devmapper snapshotter removes it too). e2fsck makes it again if needed."""
    res = runner.run(["debugfs", "-w", "-R", "rmdir lost+found", device], deadline=deadline)
    # debugfs exits 0 whatever its command did: a failure is any stderr line past its banner
    problems = [line for line in res.stderr.splitlines() if line and not line.startswith("debugfs ")]
    if problems:
        raise errors.CommandFailed(res.argv, 1, "\n".join(problems))


def _zero_out_head(device: str) -> None:
    fd = os.open(device, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.pwrite(fd, bytes(_PROBE_BYTES), 0)
        os.fsync(fd)
    finally:
        os.close(fd)


def mount(
    device: str, target: str, *, fs_type: str, options: list[str], deadline: deadline_mod.Deadline
) -> None:
    opts = list(options) + (["nouuid"] if fs_type == "xfs" and "nouuid" not in options else [])
    argv = ["mount", "-t", fs_type] + (["-o", ",".join(opts)] if opts else []) + [device, target]
    runner.run(argv, deadline=deadline)


def bind(source: str, target: str, *, read_only: bool, deadline: deadline_mod.Deadline) -> None:
    # util-linux >= 2.27 turns "bind,ro" into the bind plus the read-only remount it needs
    runner.run(["mount", "-o", "bind,ro" if read_only else "bind", source, target], deadline=deadline)


def unmount(target: str, *, deadline: deadline_mod.Deadline) -> None:
    runner.run(["umount", target], deadline=deadline)


def ext4_bytes(device: str, *, deadline: deadline_mod.Deadline) -> int:
    """Size of the ext4 filesystem on an (unmounted or mounted) device, from its superblock."""
    out = runner.run(["dumpe2fs", "-h", device], deadline=deadline).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    try:
        return int(fields["Block count"]) * int(fields["Block size"])
    except (KeyError, ValueError) as exc:
        raise errors.Internal(f"dumpe2fs -h {device}: no block count/size in its output") from exc


def grow_unmounted(device: str, fs_type: str, *, deadline: deadline_mod.Deadline) -> None:
    """Grow an unmounted ext4 to its device's size when it is smaller (restored into a larger volume).

    Offline, because ext4's online resize needs CAP_SYS_RESOURCE, which not every node plugin has;
    XFS can only grow mounted (see `grow`), so it is left to the caller after the mount.
    """
    if fs_type != "ext4" or ext4_bytes(device, deadline=deadline) >= block_size_of(device):
        return
    res = runner.run(["e2fsck", "-f", "-p", device], deadline=deadline, check=False)
    if res.returncode >= _E2FSCK_UNCORRECTED:
        raise errors.CommandFailed(res.argv, res.returncode, res.stderr or res.stdout)
    runner.run(["resize2fs", device], deadline=deadline)


def grow(device: str, mount_point: str, fs_type: str, *, deadline: deadline_mod.Deadline) -> None:
    """Grow a mounted filesystem to its device's size (a no-op when it already fills it)."""
    if fs_type == "ext4":
        if ext4_bytes(device, deadline=deadline) >= block_size_of(device):
            return
        if not has_capability(CAP_SYS_RESOURCE):
            raise errors.FailedPrecondition(
                "growing a mounted ext4 needs CAP_SYS_RESOURCE, which this node plugin lacks; "
                "the filesystem is grown the next time the volume is staged"
            )
        runner.run(["resize2fs", device], deadline=deadline)
    elif fs_type == "xfs":
        runner.run(["xfs_growfs", mount_point], deadline=deadline)
    else:
        raise errors.FailedPrecondition(f"cannot grow a {fs_type} filesystem")


def has_capability(bit: int, status_path: str = "/proc/self/status") -> bool:
    """Whether this process holds a Linux capability (in its effective set)."""
    with open(status_path, encoding="ascii") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> bit & 1)
    return False


def usage(path: str) -> Usage:
    st = os.statvfs(path)
    total = st.f_blocks * st.f_frsize
    return Usage(
        total_bytes=total,
        available_bytes=st.f_bavail * st.f_frsize,
        used_bytes=total - st.f_bfree * st.f_frsize,
        total_inodes=st.f_files,
        available_inodes=st.f_favail,
        used_inodes=st.f_files - st.f_ffree,
    )


def block_size_of(path: str) -> int:
    """Size in bytes of the block device at `path` (a device node or a bind of one)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def trim(mount_point: str, device: str, *, deadline: deadline_mod.Deadline) -> int:
    """Discard the free blocks of the filesystem on `device`, mounted at `mount_point` (fstrim): a
    thin device unmaps them from the pool, a loop device punches holes in its file. Returns the
    bytes the filesystem says it discarded.

    An exec, not the FITRIM ioctl: a trim of a big filesystem takes long, and only a child process
    can be stopped at the deadline (the kernel checks for a fatal signal between allocation groups).
    XFS returns from FITRIM with its discards still in flight (measured on 6.18: the pool's space
    came back up to a second later), so the device is flushed after it: a flush is queued behind
    the discards submitted before it, and when it completes, the space is back.

    The directory is pinned first: `csi-thin pool trim` holds no claim of the driver's, and an
    unstage may unmount `mount_point` right after the caller looked. fstrim by path would then trim
    whatever filesystem holds the emptied directory (the kubelet's); through the open directory,
    checked to be on `device`, it trims this filesystem or none. OperationPending when the path no
    longer holds it: the next run has it.
    """
    try:
        dir_fd = os.open(mount_point, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        raise errors.OperationPending(f"{mount_point} is gone (unstaged meanwhile)") from None
    try:
        try:
            rdev = os.stat(device).st_rdev
        except FileNotFoundError:
            raise errors.OperationPending(f"{device} is gone (deactivated meanwhile)") from None
        if os.fstat(dir_fd).st_dev != rdev:
            raise errors.OperationPending(
                f"{mount_point} no longer holds the filesystem of {device} (unstaged meanwhile)"
            )
        res = runner.run(["fstrim", "-v", f"/proc/self/fd/{dir_fd}"], deadline=deadline, pass_fds=(dir_fd,))
    finally:
        os.close(dir_fd)
    found = _TRIMMED.search(res.stdout)
    if found is None:
        raise errors.Internal(f"fstrim {mount_point}: unexpected output {res.stdout.strip()!r}")
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise errors.Internal(f"flush {device} after its trim: {os.strerror(exc.errno or 0)}") from exc
    return int(found.group(1))
