"""Parse /proc/self/mountinfo: the node's only source of truth about what is mounted where.

Format (proc(5)): `id parent major:minor root mount_point options [optional...] - fstype source super`
with space, tab, newline and backslash in paths escaped as octal (\\040 ...).
"""

from __future__ import annotations

import dataclasses
import os
import re

PATH = "/proc/self/mountinfo"
_OCTAL = re.compile(r"\\([0-7]{3})")


@dataclasses.dataclass(frozen=True)
class Mount:
    mount_id: int
    parent_id: int
    major: int
    minor: int
    root: str  # the path inside the filesystem that is mounted here ("/" unless a bind of a subtree)
    mount_point: str
    options: frozenset[str]  # per-mount options (ro/rw, nosuid...)
    fs_type: str
    source: str
    super_options: frozenset[str]

    @property
    def dev(self) -> int:
        return os.makedev(self.major, self.minor)

    @property
    def read_only(self) -> bool:
        return "ro" in self.options

    @property
    def writable(self) -> bool:
        """Writes reach the filesystem here: this mount is rw and so is its superblock (ext4 with
        errors=remount-ro that hit an error keeps its mounts "rw" and marks only the superblock
        `ro`, or `emergency_ro` on newer kernels)."""
        return not self.read_only and not self.super_options & {"ro", "emergency_ro"}


def unescape(field: str) -> str:
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_line(line: str) -> Mount:
    fields = line.split()
    try:
        sep = fields.index("-", 6)
        major, minor = fields[2].split(":")
        return Mount(
            mount_id=int(fields[0]),
            parent_id=int(fields[1]),
            major=int(major),
            minor=int(minor),
            root=unescape(fields[3]),
            mount_point=unescape(fields[4]),
            options=frozenset(fields[5].split(",")),
            fs_type=fields[sep + 1],
            source=unescape(fields[sep + 2]) if len(fields) > sep + 2 else "",
            super_options=frozenset(fields[sep + 3].split(",")) if len(fields) > sep + 3 else frozenset(),
        )
    except (ValueError, IndexError) as exc:
        raise ValueError(f"malformed mountinfo line: {line!r}") from exc


def parse(text: str) -> list[Mount]:
    return [parse_line(line) for line in text.splitlines() if line.strip()]


def read(path: str = PATH) -> list[Mount]:
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        return parse(f.read())


def at(mount_point: str, mounts: list[Mount] | None = None) -> Mount | None:
    """The mount visible at `mount_point` (the last one wins when mounts are stacked)."""
    found = None
    for m in read() if mounts is None else mounts:
        if m.mount_point == mount_point:
            found = m
    return found
