"""Read-only views of block volumes: what a read-only block publish binds at its target.

A `bind,ro` mount of a device node does not make the device read-only: the mount's ro flag guards
the files of a filesystem, not writes through a device node that sits on one. So a read-only block
publish binds a read-only loop device stacked on the volume's block device instead; the kernel
refuses every write to it (EPERM), while the volume's own device and its read-write publishes keep
writing. The view reads through the volume's device buffered, so it sees what its writers wrote.
Both backends get the same view: the volume's device is a dm-thin device or a loop device, and a
loop device stacks on either.

One view per (volume, target path), labelled with a digest of both in the kernel's own record of the
loop device (lo_file_name). A restarted driver finds a view from the kernel alone, by its label to
remove it, by its backing device to list a volume's views: there is no state of ours to lose or to
disagree with what exists.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os

from csi_thin import errors
from csi_thin.dm import loop

_PREFIX = "csi-thin-ro:"


@dataclasses.dataclass(frozen=True)
class View:
    path: str  # /dev/loopN
    rdev: int  # the view's own device number
    backing_rdev: int  # the volume's block device under it
    label: str
    #: unpublished while a process held it open: it goes when that process closes it
    closing: bool = False


def label(volume_id: str, target: str) -> str:
    """The label of the view that read-only publish of `volume_id` at `target` binds."""
    return _PREFIX + hashlib.sha256(f"{volume_id}\0{target}".encode()).hexdigest()[:40]


def views() -> list[View]:
    """Every read-only view on this machine (of any volume)."""
    found = []
    for dev in loop.read_only_devices():
        try:
            st = loop.status(dev)
            rdev = os.stat(dev).st_rdev
        except (errors.Internal, OSError):  # detached (or failing) meanwhile: not a view of ours
            continue
        if st is not None and st.read_only and st.label.startswith(_PREFIX):
            found.append(
                View(path=dev, rdev=rdev, backing_rdev=st.backing_rdev, label=st.label, closing=st.autoclear)
            )
    return found


def views_of(device_path: str) -> list[View]:
    """The read-only views stacked on the block device at `device_path`."""
    try:
        rdev = os.stat(device_path).st_rdev
    except FileNotFoundError:
        return []
    return [v for v in views() if v.backing_rdev == rdev]


def open_view(device_path: str, view_label: str) -> str:
    """The read-only view `view_label` of the block device at `device_path`: found, or made."""
    rdev = os.stat(device_path).st_rdev
    for v in views():
        if v.label == view_label:
            if v.backing_rdev != rdev:
                raise errors.FailedPrecondition(
                    f"a read-only view for this target ({v.path}) shows another device: unpublish it first"
                )
            if v.closing:  # binding it would publish a device that vanishes (and whose number is
                # free for any other attach) the moment its holder closes it
                raise errors.FailedPrecondition(
                    f"the read-only view {v.path} of this target was unpublished while a process held "
                    "it open; it goes when that process closes it: retry then"
                )
            return v.path
    return loop.attach(device_path, read_only=True, direct_io=False, label=view_label)


def close_view(view_label: str) -> None:
    """Remove the view `view_label`; none there is done.

    Held open exclusively while it is checked and detached, so nobody can mount it in between and
    a loop number that changed hands meanwhile is left alone. A process still holding the view open
    (not mounted) keeps it until it closes it; the kernel then detaches it.
    """
    for v in views():
        if v.label != view_label:
            continue
        try:
            fd = os.open(v.path, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno in (errno.ENXIO, errno.ENOENT, errno.ENODEV):
                continue
            if exc.errno == errno.EBUSY:
                raise errors.FailedPrecondition(
                    f"the read-only view {v.path} of this volume is mounted or claimed by another user"
                ) from exc
            raise errors.Internal(f"open {v.path}: {os.strerror(exc.errno or 0)}") from exc
        try:
            st = loop.status(v.path)
            if st is not None and st.label == view_label:
                loop.detach(v.path)
        finally:
            os.close(fd)


def refresh(device_path: str) -> None:
    """Make the views of a grown device take its new size."""
    for v in views_of(device_path):
        loop.refresh_capacity(v.path)
