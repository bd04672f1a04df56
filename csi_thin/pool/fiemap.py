"""Changed-block tracking for the reflink backend: a file's extent map (the FIEMAP ioctl) and the
ranges two files' maps say may differ.

A reflink snapshot shares its origin's extents; a later write to the origin (or to a later snapshot's
origin) gets a new extent. So two snapshot files of one volume hold the same bytes wherever both map
a logical offset to the same physical offset, and may differ everywhere else. Extents whose physical
offset does not name the bytes one to one (inline, encoded/compressed, delayed allocation, unknown)
count as changed: a delta may name too much, never too little.
"""

from __future__ import annotations

import bisect
import dataclasses
import fcntl
import itertools
import struct
from collections.abc import Sequence

from csi_thin import deadline as deadline_mod
from csi_thin import model

FS_IOC_FIEMAP = 0xC020660B  # _IOWR('f', 11, struct fiemap)
FIEMAP_FLAG_SYNC = 0x1  # write dirty pages first, so nothing is still delayed-allocated

EXTENT_LAST = 0x1
EXTENT_UNWRITTEN = 0x800  # allocated, reads as zeros
#: the physical offset does not address the bytes one to one: never compared
EXTENT_INCOMPARABLE = (
    0x2  # UNKNOWN
    | 0x4  # DELALLOC
    | 0x8  # ENCODED
    | 0x80  # DATA_ENCRYPTED
    | 0x100  # NOT_ALIGNED
    | 0x200  # DATA_INLINE
    | 0x400  # DATA_TAIL
)

_HEADER = struct.Struct(
    "=QQIIII"
)  # fm_start, fm_length, fm_flags, fm_mapped_extents, fm_extent_count, reserved
_EXTENT = struct.Struct("=QQQQQIIII")  # logical, physical, length, reserved64[2], flags, reserved[3]
_BATCH = 512  # extents per ioctl


@dataclasses.dataclass(frozen=True)
class FileExtent:
    logical: int
    physical: int
    length: int
    flags: int

    @property
    def end(self) -> int:
        return self.logical + self.length


def extents(fd: int, *, deadline: deadline_mod.Deadline) -> list[FileExtent]:
    """Every extent of the open file `fd`, ascending by logical offset (holes are absent)."""
    out: list[FileExtent] = []
    start = 0
    while True:
        deadline.check("fiemap")
        buf = bytearray(_HEADER.size + _BATCH * _EXTENT.size)
        _HEADER.pack_into(buf, 0, start, (1 << 64) - 1 - start, FIEMAP_FLAG_SYNC, 0, _BATCH, 0)
        fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
        mapped = _HEADER.unpack_from(buf, 0)[3]
        if mapped == 0:
            return out
        for i in range(mapped):
            logical, physical, length, _, _, flags, _, _, _ = _EXTENT.unpack_from(
                buf, _HEADER.size + i * _EXTENT.size
            )
            out.append(FileExtent(logical, physical, length, flags))
            if flags & EXTENT_LAST:
                return out
        start = out[-1].end


def allocated(file_extents: Sequence[FileExtent], *, size: int) -> tuple[model.Extent, ...]:
    """The ranges that hold written data: every extent but the unwritten ones (they read as zeros)."""
    return model.merge_extents(
        ((e.logical, e.length) for e in file_extents if not e.flags & EXTENT_UNWRITTEN), limit=size
    )


def _covering(file_extents: Sequence[FileExtent], starts: list[int], offset: int) -> FileExtent | None:
    i = bisect.bisect_right(starts, offset) - 1
    if i >= 0 and file_extents[i].end > offset:
        return file_extents[i]
    return None


def _same(base: FileExtent | None, target: FileExtent | None, offset: int) -> bool:
    """Whether both files surely hold the same bytes from `offset` to the next extent boundary."""
    zero_b = base is None or bool(base.flags & EXTENT_UNWRITTEN)
    zero_t = target is None or bool(target.flags & EXTENT_UNWRITTEN)
    if zero_b or zero_t:
        return zero_b and zero_t  # a hole and an unwritten extent both read as zeros
    assert base is not None and target is not None
    if (base.flags | target.flags) & EXTENT_INCOMPARABLE:
        return False
    return base.physical + (offset - base.logical) == target.physical + (offset - target.logical)


def changed(
    base: Sequence[FileExtent], target: Sequence[FileExtent], *, size: int
) -> tuple[model.Extent, ...]:
    """The ranges of [0, size) where `target` may hold other bytes than `base`."""
    bounds = {0, size}
    for e in (*base, *target):
        bounds.update((min(max(e.logical, 0), size), min(e.end, size)))
    edges = sorted(bounds)
    base_starts = [e.logical for e in base]
    target_starts = [e.logical for e in target]
    diff: list[tuple[int, int]] = []
    for a, b in itertools.pairwise(edges):
        if not _same(_covering(base, base_starts, a), _covering(target, target_starts, a), a):
            diff.append((a, b - a))
    return model.merge_extents(diff, limit=size)
