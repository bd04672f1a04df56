"""Who holds a block device, and waiting out the ones that hold it only for a moment.

Sits beside the loop and DM ioctl wrappers, under both pool backends' deactivate and teardown. On a
node, programs open block devices for a moment all the time (blkid, udev, multipathd, cadvisor, a
mount namespace cloned while a volume was mounted), so "busy" right after an unmount is normal and
passes. `retry_busy` runs a step that raises `DeviceBusy` again, backing off within the caller's
deadline; a device mounted here is in real use and is reported at once. When it stays busy, the
holders (processes with it open, sysfs holders such as dm tables, mounts in other mount namespaces)
are logged and named in the error.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections.abc import Callable
from typing import TypeVar

from csi_thin import deadline as deadline_mod
from csi_thin.dm import errors as dm_errors

log = logging.getLogger(__name__)

T = TypeVar("T")

#: how many holders an error message names (the log line has them all)
_NAMED = 8


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def _mount_points(mountinfo: str, rdev: int, source: str) -> list[str]:
    """Mount points of block device `rdev` (or of `source`: btrfs shows an anonymous number)."""
    want = f"{os.major(rdev)}:{os.minor(rdev)}"
    out: list[str] = []
    for line in mountinfo.splitlines():
        fields = line.split(" ")
        if len(fields) < 10 or "-" not in fields[6:]:
            continue
        src = fields[fields.index("-", 6) + 2]
        if fields[2] == want or (
            source and src.startswith("/") and os.path.realpath(_unescape(src)) == source
        ):
            out.append(_unescape(fields[4]))
    return out


def mount_point(rdev: int, *, source: str = "") -> str | None:
    """Where the block device is mounted in this mount namespace, if anywhere."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            points = _mount_points(f.read(), rdev, source)
    except OSError:
        return None
    return points[0] if points else None


def _comm(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return "?"


def holders(rdev: int, *, source: str = "") -> list[str]:
    """Everyone we can see holding block device `rdev`: "pid 123 (blkid) has it open",
    "holder dm-3", "mounted at /x in the mount namespace of pid 456 (runc)". Processes come and go
    while we look: whatever vanishes is skipped."""
    out: list[str] = []
    sys_dir = f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}/holders"
    with contextlib.suppress(OSError):
        out += [f"holder {name}" for name in sorted(os.listdir(sys_dir))]
    own_ns = _ns("self")
    seen_ns: set[str] = {own_ns} if own_ns else set()
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        pids = []
    me = str(os.getpid())
    for pid in sorted(pids, key=int):
        if pid != me:
            with contextlib.suppress(OSError):
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    with contextlib.suppress(OSError):
                        st = os.stat(f"/proc/{pid}/fd/{fd}")
                        if stat.S_ISBLK(st.st_mode) and st.st_rdev == rdev:
                            out.append(f"pid {pid} ({_comm(pid)}) has it open")
                            break
        ns = _ns(pid)
        if ns is None or ns in seen_ns:
            continue
        seen_ns.add(ns)
        with contextlib.suppress(OSError), open(f"/proc/{pid}/mountinfo", encoding="utf-8") as f:
            for point in _mount_points(f.read(), rdev, source):
                out.append(f"mounted at {point} in the mount namespace of pid {pid} ({_comm(pid)})")
    return out


def _ns(pid: str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def retry_busy(
    step: Callable[[], T], *, rdev: int, source: str, what: str, deadline: deadline_mod.Deadline
) -> T:
    """Run `step` until it does not raise DeviceBusy, backing off within `deadline`.

    `rdev`/`source`: the block device the step needs for itself. Mounted here: raised at once (the
    mount point named), it is not going to pass. Still busy at the deadline: raised with the
    holders named, and logged.
    """
    busy: dm_errors.DeviceBusy | None = None
    attempts = 0
    for _ in deadline.backoff(first=0.01, cap=0.25):
        attempts += 1
        try:
            return step()
        except dm_errors.DeviceBusy as exc:
            busy = exc
        point = mount_point(rdev, source=source)
        if point is not None:
            raise type(busy)(f"{busy.message}: mounted at {point}", errno=busy.errno) from busy
    assert busy is not None, "Deadline.backoff yields at least once"
    raise type(busy)(
        f"{busy.message}: still in use after {attempts} attempts until the deadline; "
        + describe(rdev, source=source, what=what),
        errno=busy.errno,
    ) from busy


def describe(rdev: int, *, source: str, what: str) -> str:
    """Log who holds the device (all of them) and say it in a few words for an error message."""
    found = holders(rdev, source=source)
    log.warning("event=device_busy what=%s dev=%d:%d holders=%r", what, os.major(rdev), os.minor(rdev), found)
    if not found:
        return "no holder visible from here (another mount namespace's mount, or the kernel)"
    more = f"; and {len(found) - _NAMED} more" if len(found) > _NAMED else ""
    return "held by: " + "; ".join(found[:_NAMED]) + more
