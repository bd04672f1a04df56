"""Loop devices by ioctl: the block devices under a file-backed pool.

Sits under the pool backends: the dm-thin backend turns its sparse data/metadata files into block
devices here, the reflink backend its pool image. No losetup (an exec per call costs ~70 ms under
emulation) and no udev (containers have none): the /dev/loopN node is created here when missing.

The API is deliberately small and stable (other backends depend on it):
`attach`, `detach`, `find`, `refresh_capacity`, `scan` + `is_backed_by` for a backend's own scan
(and `status`, `read_only_devices` for the node's read-only views).

Loop devices are machine-wide and most of them are not ours: snaps, other drivers, a container that
died with a mount. A scan reads every one of them, so whatever error one of them answers (EIO from a
backing filesystem that was shut down, EACCES, ENXIO/ENODEV when it is torn down mid-scan) means
"not ours" there: only a device that is provably ours (by path, or by file identity) counts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import logging
import os
import stat
import struct
from collections.abc import Iterator

from csi_thin import deadline as deadline_mod
from csi_thin import errors

log = logging.getLogger(__name__)

# linux/loop.h ioctl numbers
_LOOP_SET_FD = 0x4C00
_LOOP_CLR_FD = 0x4C01
_LOOP_SET_STATUS64 = 0x4C04
_LOOP_GET_STATUS64 = 0x4C05
_LOOP_SET_CAPACITY = 0x4C07
_LOOP_SET_DIRECT_IO = 0x4C08
_LOOP_CONFIGURE = 0x4C0A
_LOOP_CTL_GET_FREE = 0x4C82

_LO_FLAGS_READ_ONLY = 1
_LO_FLAGS_AUTOCLEAR = 4
_LO_FLAGS_DIRECT_IO = 16

_LO_NAME_SIZE = 64
_LO_KEY_SIZE = 32
# struct loop_info64: lo_device, lo_inode, lo_rdevice, lo_offset, lo_sizelimit (u64);
# lo_number, lo_encrypt_type, lo_encrypt_key_size, lo_flags (u32); lo_file_name[64],
# lo_crypt_name[64], lo_encrypt_key[32] (u8); lo_init[2] (u64). 232 bytes, no padding.
_INFO64 = struct.Struct(f"=5Q4I{_LO_NAME_SIZE}s{_LO_NAME_SIZE}s{_LO_KEY_SIZE}s2Q")
# struct loop_config: fd, block_size (u32); struct loop_info64 info; __u64 __reserved[8]
_CONFIG = struct.Struct(f"=2I{_INFO64.size}s8Q")

_LOOP_MAJOR = 7
_LOOP_CONTROL = "/dev/loop-control"
_LOOP_CONTROL_DEV = (10, 237)  # misc major, LOOP_CTRL_MINOR

#: errnos of a loop device that is no longer there to use: torn down (LOOP_CTL_REMOVE, or a detach in
#: progress: the kernel refuses opens during rundown) or its node removed, between our look-up and use
_GONE = (errno.ENOENT, errno.ENXIO, errno.ENODEV)


class Unreadable(errors.Internal):
    """A loop device answered an error we cannot read past (EIO from a backing filesystem that was
    shut down, EACCES...). Never provably ours: scans skip it."""

    def __init__(self, message: str, *, errno: int) -> None:
        super().__init__(message)
        self.errno = errno


def _info64(path: str, flags: int) -> bytes:
    name = os.fsencode(path)[: _LO_NAME_SIZE - 1]
    return _INFO64.pack(0, 0, 0, 0, 0, 0, 0, 0, flags, name, b"", b"", 0, 0)


def _ensure_node(path: str, *, char: bool, major: int, minor: int) -> None:
    """Create a device node when the container's /dev lacks it (no udev, no devtmpfs propagation)."""
    kind = stat.S_IFCHR if char else stat.S_IFBLK
    try:
        st = os.stat(path)
    except FileNotFoundError:
        with contextlib.suppress(FileExistsError):
            os.mknod(path, 0o660 | kind, os.makedev(major, minor))
        return
    if (st.st_mode & kind) != kind or st.st_rdev != os.makedev(major, minor):
        raise errors.Internal(f"{path} exists but is not device {major}:{minor}")


def _dev_path(number: int) -> str:
    path = f"/dev/loop{number}"
    _ensure_node(path, char=False, major=_LOOP_MAJOR, minor=number)
    return path


def _number(dev: str) -> int:
    base = os.path.basename(dev)
    if not base.startswith("loop") or not base[4:].isdigit():
        raise errors.InvalidArgument(f"not a loop device path: {dev!r}")
    return int(base[4:])


def _supports_direct_io(path: str, *, read_only: bool) -> bool:
    """The backing file accepts O_DIRECT (tmpfs before 6.6, 9p, overlay on some lowers do not)."""
    try:
        fd = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_DIRECT)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return False
        raise
    os.close(fd)
    return True


def _get_free() -> int:
    _ensure_node(_LOOP_CONTROL, char=True, major=_LOOP_CONTROL_DEV[0], minor=_LOOP_CONTROL_DEV[1])
    ctl = os.open(_LOOP_CONTROL, os.O_RDWR | os.O_CLOEXEC)
    try:
        return fcntl.ioctl(ctl, _LOOP_CTL_GET_FREE)
    finally:
        os.close(ctl)


def _configure(loop_fd: int, file_fd: int, path: str, flags: int) -> None:
    """LOOP_CONFIGURE (5.8+: one atomic call); LOOP_SET_FD + LOOP_SET_STATUS64 on older kernels."""
    cfg = _CONFIG.pack(file_fd, 0, _info64(path, flags), *([0] * 8))
    try:
        fcntl.ioctl(loop_fd, _LOOP_CONFIGURE, cfg)
    except OSError as exc:
        unknown_ioctl = exc.errno == errno.ENOTTY or (exc.errno == errno.EINVAL and _old_kernel())
        if not unknown_ioctl:
            raise
    else:
        return
    fcntl.ioctl(loop_fd, _LOOP_SET_FD, file_fd)
    try:
        fcntl.ioctl(loop_fd, _LOOP_SET_STATUS64, _info64(path, flags & ~_LO_FLAGS_DIRECT_IO))
        if flags & _LO_FLAGS_DIRECT_IO:
            fcntl.ioctl(loop_fd, _LOOP_SET_DIRECT_IO, 1)
    except OSError:
        with contextlib.suppress(OSError):
            fcntl.ioctl(loop_fd, _LOOP_CLR_FD)
        raise


def _old_kernel() -> bool:
    """True before 5.8, where LOOP_CONFIGURE is unknown (some kernels answer EINVAL, not ENOTTY)."""
    major, minor = (int(x) for x in os.uname().release.split(".")[:2])
    return (major, minor) < (5, 8)


def attach(
    path: str,
    *,
    read_only: bool = False,
    direct_io: bool = True,
    label: str = "",
    deadline: deadline_mod.Deadline | None = None,
) -> str:
    """Attach `path` to a free loop device and return the device path (/dev/loopN).

    Direct IO (no double caching through the page cache) is used when asked for and the backing
    file supports O_DIRECT; otherwise the device is attached buffered. `label` (at most 63 bytes)
    is kept by the kernel in the device's lo_file_name (see `status`) instead of the path.

    LOOP_CTL_GET_FREE races are normal: the number it gives is free for everyone, so another process
    may configure it first (EBUSY) or tear it down before we open it (ENXIO, ENOENT). Each time the
    whole allocate-open-configure sequence starts again with a fresh number, backing off within the
    deadline (None: the default one, for the CLI and tests).
    """
    if len(os.fsencode(label)) >= _LO_NAME_SIZE:
        raise errors.InvalidArgument(f"loop label {label!r} is longer than {_LO_NAME_SIZE - 1} bytes")
    deadline = deadline or deadline_mod.default()
    path = os.path.realpath(path)
    use_dio = direct_io and _supports_direct_io(path, read_only=read_only)
    flags = _LO_FLAGS_READ_ONLY if read_only else 0
    file_fd = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
    lost, last = 0, ""  # numbers lost to another process, and how the last one was lost
    try:
        for _ in deadline.backoff(first=0.001, cap=0.05):
            dev = _dev_path(_get_free())
            try:
                loop_fd = os.open(dev, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
            except OSError as exc:
                if exc.errno not in _GONE:
                    raise
                lost, last = lost + 1, f"{dev}: {os.strerror(exc.errno or 0)}"
                continue
            try:
                try:
                    _configure(
                        loop_fd, file_fd, label or path, flags | (_LO_FLAGS_DIRECT_IO if use_dio else 0)
                    )
                except OSError as exc:
                    if exc.errno != errno.EINVAL or not use_dio:
                        raise
                    # block size / alignment mismatch for direct IO: attach buffered instead
                    use_dio = False
                    _configure(loop_fd, file_fd, label or path, flags)
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    raise
                lost, last = lost + 1, f"{dev}: taken"  # someone configured this number first
                continue
            finally:
                os.close(loop_fd)
            if lost:
                log.info("event=loop_attach_raced file=%s dev=%s lost=%d last=%r", path, dev, lost, last)
            return dev
        raise errors.Unavailable(
            f"no free loop device for {path} before the deadline ({lost} taken or torn down "
            f"under us, last {last or 'none'})"
        )
    except OSError as exc:
        raise errors.Internal(f"attach loop device for {path}: {os.strerror(exc.errno or 0)}") from exc
    finally:
        os.close(file_fd)


def detach(dev: str) -> None:
    """Detach a loop device. An already detached (or absent) device is fine.

    If the device is still open (a dm table on it), the kernel detaches it when the last user
    closes it.
    """
    _number(dev)
    try:
        fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    except OSError as exc:
        if exc.errno in (errno.ENXIO, errno.ENODEV):
            return
        raise errors.Internal(f"open {dev}: {os.strerror(exc.errno or 0)}") from exc
    try:
        fcntl.ioctl(fd, _LOOP_CLR_FD)
    except OSError as exc:
        if exc.errno != errno.ENXIO:  # ENXIO: not bound to a file
            raise errors.Internal(f"detach {dev}: {os.strerror(exc.errno or 0)}") from exc
    finally:
        os.close(fd)


def backing_file(dev: str) -> str | None:
    """The file behind a loop device, or None when it is not attached."""
    return _read_backing_file(f"loop{_number(dev)}")


def _read_backing_file(name: str) -> str | None:
    """Read /sys/block/<name>/loop/backing_file. Loop devices are machine-wide: another process may
    detach one while we read it, and the kernel then answers ENODEV/ENXIO; that, like a missing
    attribute, means "not attached"."""
    try:
        with open(f"/sys/block/{name}/loop/backing_file", encoding="utf-8") as f:
            return f.read().rstrip("\n")
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        if exc.errno in (errno.ENODEV, errno.ENXIO):
            return None
        raise


def identity(dev: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the file behind a loop device (LOOP_GET_STATUS64); None when unbound or
    gone. Unreadable when the device answers anything else (EIO: its backing filesystem failed)."""
    _number(dev)
    try:
        fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in _GONE:
            return None
        raise Unreadable(f"open {dev}: {os.strerror(exc.errno or 0)}", errno=exc.errno or 0) from exc
    try:
        info = fcntl.ioctl(fd, _LOOP_GET_STATUS64, bytes(_INFO64.size))
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # not bound to a file
            return None
        raise Unreadable(f"status of {dev}: {os.strerror(exc.errno or 0)}", errno=exc.errno or 0) from exc
    finally:
        os.close(fd)
    lo_device, lo_inode = _INFO64.unpack(info)[:2]
    return os.makedev(os.major(lo_device), os.minor(lo_device)), lo_inode


def scan() -> Iterator[tuple[str, str]]:
    """(/dev/loopN, backing file as sysfs shows it) of every bound loop device, lowest number first.

    A device whose attribute cannot be read (torn down mid-scan, or any other error) is skipped: it
    cannot be shown to be ours. The /dev node is not created here (see `find`)."""
    try:
        names = os.listdir("/sys/block")
    except FileNotFoundError:
        return
    for name in sorted(names, key=lambda n: (len(n), n)):
        if not name.startswith("loop") or not name[4:].isdigit():
            continue
        try:
            backing = _read_backing_file(name)
        except OSError as exc:
            log.debug("event=loop_unreadable dev=/dev/%s errno=%d", name, exc.errno or 0)
            continue
        if backing:
            yield f"/dev/{name}", backing


def is_backed_by(dev: str, file_id: tuple[int, int]) -> bool:
    """True only when `dev` is provably attached to the file with (st_dev, st_ino) `file_id`: a device
    that is unbound, gone or unreadable (see `Unreadable`) is not."""
    try:
        return identity(dev) == file_id
    except Unreadable as exc:
        log.debug("event=loop_unreadable dev=%s errno=%d", dev, exc.errno)
        return False


def find(backing_file_path: str) -> str | None:
    """The loop device attached to `backing_file_path` (compared after resolving symlinks), if any.

    sysfs shows the backing file's path as seen through the mount it was opened by. When that mount
    has gone (it lived in the mount namespace of a container that has since been replaced), the path
    shown is relative to the old mount's root: "/devices/1.img" for "/pool/devices/1.img". Such a
    suffix of our path is confirmed by the file's identity (device and inode) before it counts; a
    device that cannot tell its identity (EIO...) is someone else's.
    """
    want = os.path.realpath(backing_file_path)
    wanted_id: tuple[int, int] | None = None
    for dev, backing in scan():
        if backing == want:
            return _dev_path(_number(dev))
        if not backing.startswith("/") or not want.endswith(backing):
            continue
        if wanted_id is None:
            try:
                st = os.stat(want)
            except OSError:  # gone, or its filesystem failed: nothing to confirm a suffix with
                return None
            wanted_id = (st.st_dev, st.st_ino)
        try:
            path = _dev_path(_number(dev))
        except (OSError, errors.Internal):  # no node for it here, and none can be made: not ours
            continue
        if is_backed_by(path, wanted_id):
            return path
    return None


def refresh_capacity(dev: str) -> None:
    """Make the loop device pick up its backing file's new size (after the file was grown)."""
    _number(dev)
    fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, _LOOP_SET_CAPACITY, 0)
    except OSError as exc:
        raise errors.Internal(f"refresh capacity of {dev}: {os.strerror(exc.errno or 0)}") from exc
    finally:
        os.close(fd)


def size_bytes(dev: str) -> int:
    """Current size of a loop device as the kernel sees it."""
    number = _number(dev)
    with open(f"/sys/block/loop{number}/size", encoding="utf-8") as f:
        return int(f.read()) * 512


@dataclasses.dataclass(frozen=True)
class Status:
    """What the kernel keeps of an attached loop device (LOOP_GET_STATUS64)."""

    #: st_rdev of the backing file: the block device under a loop device stacked on one, else 0
    backing_rdev: int
    read_only: bool
    #: detached by the kernel when its last opener closes it (a detach asked while it was open)
    autoclear: bool
    #: lo_file_name: the `label` given to `attach`, else (the first 63 bytes of) the backing path
    label: str


def status(dev: str) -> Status | None:
    """The status of loop device `dev`; None when it is not attached (or not there at all)."""
    _number(dev)
    try:
        fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENXIO, errno.ENODEV):
            return None
        raise errors.Internal(f"open {dev}: {os.strerror(exc.errno or 0)}") from exc
    try:
        info = fcntl.ioctl(fd, _LOOP_GET_STATUS64, bytes(_INFO64.size))
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # not bound to a file
            return None
        raise errors.Internal(f"status of {dev}: {os.strerror(exc.errno or 0)}") from exc
    finally:
        os.close(fd)
    fields = _INFO64.unpack(info)
    rdevice, flags, name = fields[2], fields[8], fields[9]
    return Status(
        backing_rdev=os.makedev(os.major(rdevice), os.minor(rdevice)) if rdevice else 0,
        read_only=bool(flags & _LO_FLAGS_READ_ONLY),
        autoclear=bool(flags & _LO_FLAGS_AUTOCLEAR),
        label=os.fsdecode(name.split(b"\0", 1)[0]),
    )


def read_only_devices() -> list[str]:
    """Every attached read-only loop device (/dev/loopN), from sysfs alone: nothing is opened."""
    try:
        names = os.listdir("/sys/block")
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        if not name.startswith("loop") or not name[4:].isdigit():
            continue
        try:
            with open(f"/sys/block/{name}/ro", encoding="ascii") as f:
                if f.read().strip() != "1":
                    continue
            backing = _read_backing_file(name)
        except OSError:  # detached meanwhile, or unreadable (EIO, EACCES): not provably a view of ours
            continue
        if backing is not None:
            found.append(_dev_path(int(name[4:])))
    return found
