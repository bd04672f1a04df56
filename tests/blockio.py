"""Direct block-device I/O for tests on real devices (dm-thin devices, loop devices)."""

from __future__ import annotations

import dataclasses
import fcntl
import mmap
import os
import struct


def write_at(path: str, offset: int, data: bytes) -> None:
    """Write `data` at `offset` and fsync it through the device."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_at(path: str, offset: int, length: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def device_size(path: str) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


# FIEMAP (linux/fiemap.h): where a file's bytes sit on its filesystem's block device
_FS_IOC_FIEMAP = 0xC020660B  # _IOWR('f', 11, struct fiemap)
_FIEMAP_FLAG_SYNC = 0x1
#: fm_start, fm_length, fm_flags, fm_mapped_extents, fm_extent_count, reserved
_FIEMAP_HEAD = struct.Struct("=QQIIII")
#: fe_logical, fe_physical, fe_length, reserved, fe_flags, reserved
_FIEMAP_EXTENT = struct.Struct("=QQQ16xI12x")
#: extents whose physical bytes are not the file's plain data: unknown location, delayed allocation,
#: encoded, encrypted, unaligned, inline in metadata, packed tail, allocated but unwritten
_NOT_PLAIN = 0x2 | 0x4 | 0x8 | 0x80 | 0x100 | 0x200 | 0x400 | 0x800


@dataclasses.dataclass(frozen=True)
class Extent:
    logical: int  # offset in the file
    physical: int  # offset on the block device
    length: int


def file_extents(path: str, *, max_extents: int = 512) -> list[Extent]:
    """The extents of a regular file's data (synced first), clipped to its size. Fails on anything
    that is not plain data at a known device offset, so the caller can read the bytes raw."""
    size = os.stat(path).st_size
    buf = bytearray(_FIEMAP_HEAD.size + max_extents * _FIEMAP_EXTENT.size)
    _FIEMAP_HEAD.pack_into(buf, 0, 0, 2**64 - 1, _FIEMAP_FLAG_SYNC, 0, max_extents, 0)
    with open(path, "rb") as f:
        fcntl.ioctl(f.fileno(), _FS_IOC_FIEMAP, buf)
    mapped = _FIEMAP_HEAD.unpack_from(buf)[3]
    if mapped >= max_extents:
        raise AssertionError(f"{path}: {mapped} extents or more, over the {max_extents} asked for")
    out: list[Extent] = []
    for i in range(mapped):
        logical, physical, length, flags = _FIEMAP_EXTENT.unpack_from(
            buf, _FIEMAP_HEAD.size + i * _FIEMAP_EXTENT.size
        )
        if logical >= size:
            continue  # preallocation past the end of the file
        if flags & _NOT_PLAIN:
            raise AssertionError(f"{path}: extent at {logical} has flags {flags:#x}, not plain data")
        out.append(Extent(logical, physical, min(length, size - logical)))
    covered = sum(e.length for e in out)
    if covered != size:
        raise AssertionError(f"{path}: extents cover {covered} of its {size} bytes (holes?)")
    return sorted(out, key=lambda e: e.logical)


def read_direct(path: str, offset: int, length: int) -> bytes:
    """Read from a block device with O_DIRECT: the device's bytes, not a page cache's copy of them
    (buffered reads of a device can serve pages cached before a filesystem wrote underneath)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        sector = 512
        start = offset - offset % sector
        end = -(-(offset + length) // sector) * sector
        buf = mmap.mmap(-1, end - start)  # page-aligned, as O_DIRECT needs
        try:
            got = os.preadv(fd, [buf], start)
            if got != end - start:
                raise AssertionError(f"{path}: short direct read at {start}: {got} of {end - start}")
            return bytes(buf[offset - start : offset - start + length])
        finally:
            buf.close()
    finally:
        os.close(fd)


def read_file_raw(path: str, device: str) -> bytes:
    """A file's contents read from the raw block device its filesystem sits on, through FIEMAP."""
    return b"".join(read_direct(device, e.physical, e.length) for e in file_extents(path))
