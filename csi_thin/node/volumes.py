"""Stage, publish, stats and expansion of pool devices on this node.

Flow: NodeStageVolume activates the device (the only time a thin device is active) and, for mount
volumes, makes and mounts its filesystem at the staging path; NodePublishVolume bind-mounts the
staged filesystem (or the block device node; for a read-only block publish, a read-only view of it:
see `blockview`) at the target; the reverse calls undo each step and deactivate the device. What
the CO names is checked against what this driver made: for an unknown volume nothing is touched
(unpublish and unstage are done when nothing is mounted there, else NOT_FOUND), and unpublish
removes only a target publish could have made (`_remove_made_target`).
Mount state is always read back from /proc/self/mountinfo, so every call is idempotent: a repeated
call finds its own work done and succeeds; a different device or mode at the same path is
ALREADY_EXISTS. Every mutating call holds a per-volume claim for its whole
check-then-act sequence (probe, mkfs, mount): a second call on the same volume while one runs gets
OperationPending (ABORTED) instead of racing it into a double mkfs. Stats take no claim: they only read.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import errno
import logging
import os
import stat
import threading
from collections.abc import Iterator
from typing import Protocol

from csi_thin import deadline as deadline_mod
from csi_thin import errors, model
from csi_thin.node import blockview, filesystem, mountinfo
from csi_thin.pool import health

log = logging.getLogger(__name__)


class Engine(Protocol):
    """The part of `csi_thin.pool.engine.PoolEngine` the node uses."""

    def activate(self, name: str, *, deadline: deadline_mod.Deadline) -> model.Device: ...
    def deactivate(self, name: str, *, deadline: deadline_mod.Deadline) -> model.Device: ...
    def get(self, name: str) -> model.Device | None: ...
    def list(self, *, kind: model.DeviceKind | None = None) -> list[model.Device]: ...
    def lost(self) -> builtins.list[str]:
        """The names of the LOST records (an index: no scan of every record)."""
        ...

    def status(self, *, deadline: deadline_mod.Deadline) -> model.PoolStatus: ...


@dataclasses.dataclass(frozen=True)
class Capability:
    block: bool
    fs_type: str = "ext4"
    mount_flags: tuple[str, ...] = ()
    #: the access mode only allows reading (SINGLE_NODE_READER_ONLY)
    read_only: bool = False
    #: the access mode allows one publish at a time (SINGLE_NODE_SINGLE_WRITER, Kubernetes'
    #: ReadWriteOncePod)
    single_writer: bool = False


@dataclasses.dataclass(frozen=True)
class Stats:
    usage: filesystem.Usage | None  # None for block volumes
    block_bytes: int  # block volumes: device size


#: this node's own reasons (the pool's are in csi_thin.pool.health)
DEVICE_MISSING = "DeviceMissing"
NOT_STAGED = "NotStaged"
NOT_PUBLISHED = "NotPublished"
FILESYSTEM_READ_ONLY = "FilesystemReadOnly"


class Claims:
    """Non-blocking per-key claims: the loser of a race is told to retry, never queued. Shared with
    the trim schedule (csi_thin.node.trim), which claims a volume around its fstrim: an unstage then
    gets ABORTED (and is retried) instead of an unmount failing busy under fstrim."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._held: set[str] = set()

    @contextlib.contextmanager
    def claim(self, key: str) -> Iterator[None]:
        with self._mutex:
            if key in self._held:
                raise errors.OperationPending(f"an operation on volume {key!r} is in progress; retry later")
            self._held.add(key)
        try:
            yield
        finally:
            with self._mutex:
                self._held.discard(key)


class NodeVolumes:
    def __init__(self, *, engine: Engine, thresholds: model.Thresholds, claims: Claims | None = None) -> None:
        self._engine = engine
        self._thresholds = thresholds
        self._claims = claims or Claims()

    def recorded(self, volume_id: str) -> dict[str, str]:
        """What CreateVolume recorded of the volume (its access and filesystem type): the truth the
        CSI edge checks a request's capability and volume_context against. {} for an unknown id."""
        device = self._engine.get(volume_id)
        if device is None or device.kind != model.DeviceKind.VOLUME:
            return {}
        return dict(device.attributes)

    # -- stage -----------------------------------------------------------------------------------

    def stage(
        self, volume_id: str, staging_path: str, cap: Capability, *, deadline: deadline_mod.Deadline
    ) -> None:
        staging_path = _resolve(staging_path, "staging_target_path")
        with self._claims.claim(volume_id):
            self._stage(volume_id, staging_path, cap, deadline=deadline)

    def _stage(
        self, volume_id: str, staging_path: str, cap: Capability, *, deadline: deadline_mod.Deadline
    ) -> None:
        self._device(volume_id)
        if cap.block:
            self._engine.activate(volume_id, deadline=deadline)
            return
        _make_dir(staging_path)
        current = mountinfo.at(staging_path)
        if current is not None:
            self._check_same_device(volume_id, current, staging_path)
            if current.fs_type != cap.fs_type or current.read_only != cap.read_only:
                mode = "read-only" if current.read_only else "read-write"
                raise errors.AlreadyExists(
                    f"volume {volume_id} is staged at {staging_path} as {current.fs_type} {mode}, "
                    f"not as requested ({cap.fs_type}, {'read-only' if cap.read_only else 'read-write'})"
                )
            return
        activated = self._engine.activate(volume_id, deadline=deadline)
        device = _path(activated)
        in_use = _mounted_elsewhere(activated, staging_path)
        if in_use:  # published raw, or staged at another path: never probe, format or fsck under it
            raise errors.FailedPrecondition(f"volume {volume_id} is in use at {', '.join(in_use)}")
        found = filesystem.probe(device, deadline=deadline)
        if found is None:
            filesystem.make(device, cap.fs_type, deadline=deadline)
        elif found != cap.fs_type:
            raise errors.FailedPrecondition(
                f"volume {volume_id} holds a {found} filesystem, not the requested {cap.fs_type}"
            )
        # restored or cloned into a larger volume, the filesystem still has its source's size
        grow = found is not None and not cap.read_only
        if grow:
            filesystem.grow_unmounted(device, cap.fs_type, deadline=deadline)
        options = list(cap.mount_flags) + (["ro"] if cap.read_only else [])
        try:
            filesystem.mount(device, staging_path, fs_type=cap.fs_type, options=options, deadline=deadline)
        except errors.CommandFailed as exc:
            self._explain_full_pool(volume_id, cap, exc, deadline=deadline)
            raise
        if grow and cap.fs_type == "xfs":
            filesystem.grow(device, staging_path, cap.fs_type, deadline=deadline)

    def _explain_full_pool(
        self, volume_id: str, cap: Capability, exc: errors.CommandFailed, *, deadline: deadline_mod.Deadline
    ) -> None:
        """A read-write mount that failed on a full pool failed for want of space: a mount writes (the
        superblock, a journal replay), and a block the volume shares with a snapshot must be copied
        first. Say so (RESOURCE_EXHAUSTED), rather than the mount's "can't read superblock"."""
        if cap.read_only or self._engine.status(deadline=deadline).mode != model.PoolMode.OUT_OF_DATA_SPACE:
            return
        raise errors.PoolFull(
            f"volume {volume_id} cannot be mounted read-write while the pool's data space is full (the "
            "mount writes, and blocks shared with a snapshot must be copied first): stage it read-only, "
            f"or free space by deleting volumes or snapshots. {exc.message}"
        ) from exc

    def unstage(self, volume_id: str, staging_path: str, *, deadline: deadline_mod.Deadline) -> None:
        staging_path = _resolve(staging_path, "staging_target_path")
        with self._claims.claim(volume_id):
            self._unstage(volume_id, staging_path, deadline=deadline)

    def _unstage(self, volume_id: str, staging_path: str, *, deadline: deadline_mod.Deadline) -> None:
        device = self._known(volume_id, staging_path)
        if device is None:
            return
        published = _mounted_elsewhere(device, staging_path)
        if published:
            raise errors.FailedPrecondition(
                f"volume {volume_id} is still published at {', '.join(published)}: unpublish it first"
            )
        views = blockview.views_of(device.path) if device.path else []
        if views:  # not mounted any more, but still open by someone: the device must stay
            raise errors.FailedPrecondition(
                f"volume {volume_id} still has read-only views ({', '.join(v.path for v in views)}) open"
            )
        self._unmount_own(volume_id, staging_path, deadline=deadline)
        if self._engine.get(volume_id) is not None:
            self._engine.deactivate(volume_id, deadline=deadline)

    # -- publish ---------------------------------------------------------------------------------

    def publish(
        self,
        volume_id: str,
        *,
        staging_path: str,
        target_path: str,
        cap: Capability,
        read_only: bool,
        deadline: deadline_mod.Deadline,
    ) -> None:
        staging_path = _resolve(staging_path, "staging_target_path")
        target_path = _resolve(target_path, "target_path")
        with self._claims.claim(volume_id):
            self._publish(
                volume_id,
                staging_path=staging_path,
                target_path=target_path,
                cap=cap,
                read_only=read_only,
                deadline=deadline,
            )

    def _publish(
        self,
        volume_id: str,
        *,
        staging_path: str,
        target_path: str,
        cap: Capability,
        read_only: bool,
        deadline: deadline_mod.Deadline,
    ) -> None:
        device = self._device(volume_id)
        read_only = read_only or cap.read_only
        if cap.block:
            if not device.active or not device.path:
                raise errors.FailedPrecondition(f"volume {volume_id} is not staged")
            source = device.path
        else:
            staged = mountinfo.at(staging_path)
            if staged is None:
                raise errors.FailedPrecondition(f"volume {volume_id} is not staged at {staging_path}")
            self._check_same_device(volume_id, staged, staging_path)
            source = staging_path
        view = blockview.label(volume_id, target_path) if cap.block and read_only else None
        current = mountinfo.at(target_path)
        if current is not None:
            self._check_published(device, current, target_path, read_only=read_only, view=view)
            return
        if cap.single_writer:
            # CSI: a SINGLE_NODE_SINGLE_WRITER volume published at another target path is
            # FAILED_PRECONDITION (the staging mount is no publish)
            others = [p for p in _mounted_elsewhere(device, target_path) if p != staging_path]
            if others:
                raise errors.FailedPrecondition(
                    f"volume {volume_id} is SINGLE_NODE_SINGLE_WRITER and already published at "
                    f"{', '.join(others)}"
                )
        if cap.block:
            _make_file(target_path)
        else:
            _make_dir(target_path)
        if view is not None:
            source = blockview.open_view(source, view)
        try:
            filesystem.bind(source, target_path, read_only=read_only, deadline=deadline)
        except BaseException:
            if view is not None:
                with contextlib.suppress(errors.CsiThinError):  # unpublish removes it otherwise
                    blockview.close_view(view)
            raise

    def _check_published(
        self,
        device: model.Device,
        current: mountinfo.Mount,
        target: str,
        *,
        read_only: bool,
        view: str | None,
    ) -> None:
        """A repeated publish finds its own work done; anything else at the target is a conflict."""
        if not self._is_device(device, current, target):
            raise errors.AlreadyExists(f"{target} already has another device mounted")
        if current.read_only != read_only:
            raise errors.AlreadyExists(f"{target} is published with another read-only mode")
        if view is not None and not _shows_view(target, view):
            # the device node itself, bound read-only (as before read-only views): writable
            raise errors.AlreadyExists(
                f"{target} is published without a read-only device: unpublish and publish it again"
            )

    def unpublish(self, volume_id: str, target_path: str, *, deadline: deadline_mod.Deadline) -> None:
        target_path = _resolve(target_path, "target_path")
        with self._claims.claim(volume_id):
            self._unpublish(volume_id, target_path, deadline=deadline)

    def _unpublish(self, volume_id: str, target_path: str, *, deadline: deadline_mod.Deadline) -> None:
        if self._known(volume_id, target_path) is None:
            return
        self._unmount_own(volume_id, target_path, deadline=deadline)
        # looked at once the target is unmounted: copies of its bind made by mount propagation go with it
        view = blockview.label(volume_id, target_path)
        bound = _view_bound_elsewhere(view, target_path)
        if bound:  # detached, its number would be free for any other attach while still bound there
            raise errors.FailedPrecondition(
                f"the read-only view of {target_path} is still bound at {', '.join(bound)}: unmount it first"
            )
        blockview.close_view(view)
        _remove_made_target(target_path)

    # -- health (CSI 1.13's NodeGetVolumeHealth, NodeGetStorageHealth) -----------------------------

    def storage_health(self, *, deadline: deadline_mod.Deadline) -> tuple[health.Issue, ...]:
        """The pool's health: its condition, its space against the thresholds, its lost devices."""
        try:
            status = self._engine.status(deadline=deadline)
        except errors.Unavailable as exc:
            return (health.unavailable(exc.message),)
        return health.pool(status, self._thresholds, lost=self._engine.lost())

    def volume_health(
        self, volume_id: str, *, staging_path: str, publish_path: str, deadline: deadline_mod.Deadline
    ) -> tuple[health.Issue, ...]:
        """One volume's health from this node: its record (lost?), its device node, what the given
        paths show (the CO passes where it staged or published, or tried to: a path without the
        volume is INACCESSIBLE there, not an error), and its pool's issues. Like stats, takes no claim.
        """
        device = self._device(volume_id)
        try:
            status = self._engine.status(deadline=deadline)
        except errors.Unavailable as exc:
            return (health.unavailable(exc.message),)
        pool_issues = health.volume(device, status, self._thresholds)
        return (*self._device_issues(device, staging_path, publish_path), *pool_issues)

    def _device_issues(
        self, device: model.Device, staging_path: str, publish_path: str
    ) -> list[health.Issue]:
        issues: list[health.Issue] = []
        if device.active and (not device.path or not os.path.exists(device.path)):
            issues.append(
                health.Issue(
                    health.Severity.INACCESSIBLE,
                    DEVICE_MISSING,
                    f"{device.name} is active but its block device {device.path or ''} is missing",
                )
            )
        block = dict(device.attributes).get(model.ATTR_ACCESS_TYPE) == "block"
        # a block volume's staging only activates the device: nothing is at its staging path
        paths = [(NOT_STAGED, "staged", "staging_target_path", staging_path)] if not block else []
        paths.append((NOT_PUBLISHED, "published", "volume_publish_path", publish_path))
        for reason, verb, field, given in paths:
            if not given:
                continue
            path = _resolve(given, field)
            shown, forced_ro = self._shown_at(device, path)
            if not shown:
                issues.append(
                    health.Issue(
                        health.Severity.INACCESSIBLE, reason, f"{device.name} is not {verb} at {path}"
                    )
                )
            elif forced_ro and not any(i.reason == FILESYSTEM_READ_ONLY for i in issues):
                issues.append(
                    health.Issue(
                        health.Severity.DEGRADED,
                        FILESYSTEM_READ_ONLY,
                        f"the filesystem of {device.name} turned read-only after an IO or corruption "
                        f"error (at {path}): writes fail until it is unmounted, checked (fsck) and "
                        "mounted again",
                    )
                )
        return issues

    def _shown_at(self, device: model.Device, path: str) -> tuple[bool, bool]:
        """Whether `path` shows this device (its filesystem, or its block device node), and whether
        that filesystem went read-only by itself."""
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            return False, False
        if stat.S_ISBLK(st.st_mode):
            return self._is_device_node(device, st), False
        mount = mountinfo.at(path)
        if mount is None or not self._is_device(device, mount, path):
            return False, False
        return True, _forced_read_only(mount)

    # -- stats and expansion ---------------------------------------------------------------------

    def stats(self, volume_id: str, volume_path: str, *, deadline: deadline_mod.Deadline) -> Stats:
        volume_path = _resolve(volume_path, "volume_path")
        device = self._device(volume_id)
        try:
            st = os.stat(volume_path)
        except FileNotFoundError as exc:
            raise errors.NotFound(f"volume path {volume_path} does not exist") from exc
        if stat.S_ISBLK(st.st_mode):
            if not self._is_device_node(device, st):
                raise errors.NotFound(f"{volume_path} is not the block device of volume {volume_id}")
            return Stats(usage=None, block_bytes=filesystem.block_size_of(volume_path))
        mount = mountinfo.at(volume_path)
        if mount is None or not self._is_device(device, mount, volume_path):
            raise errors.NotFound(f"volume {volume_id} is not mounted at {volume_path}")
        return Stats(usage=filesystem.usage(volume_path), block_bytes=0)

    def expand(
        self, volume_id: str, volume_path: str, *, block: bool | None, deadline: deadline_mod.Deadline
    ) -> int:
        """Grow the filesystem at volume_path to the device size; return the device size."""
        volume_path = _resolve(volume_path, "volume_path")
        with self._claims.claim(volume_id):
            return self._expand(volume_id, volume_path, block=block, deadline=deadline)

    def _expand(
        self, volume_id: str, volume_path: str, *, block: bool | None, deadline: deadline_mod.Deadline
    ) -> int:
        device = self._device(volume_id)
        if not device.active or not device.path:
            raise errors.FailedPrecondition(f"volume {volume_id} is not staged on this node")
        if not os.path.exists(volume_path):
            raise errors.NotFound(f"volume path {volume_path} does not exist")
        if block or stat.S_ISBLK(os.stat(volume_path).st_mode):
            blockview.refresh(device.path)
            return filesystem.block_size_of(device.path)
        mount = mountinfo.at(volume_path)
        if mount is None or not self._is_device(device, mount, volume_path):
            raise errors.NotFound(f"volume {volume_id} is not mounted at {volume_path}")
        filesystem.grow(device.path, volume_path, mount.fs_type, deadline=deadline)
        return filesystem.block_size_of(device.path)

    # -- helpers ---------------------------------------------------------------------------------

    def _known(self, volume_id: str, path: str) -> model.Device | None:
        """The volume unpublish or unstage is asked to take away from `path`; None when it does not
        exist and nothing is mounted at `path`: then nothing of ours can be there, nothing is touched
        and the call is done. Kubelet retries a failed teardown forever and removes the directory
        itself after an OK: a volume deleted while its node was down must not leave its pods stuck.
        Something mounted there is not an unknown volume's to unmount: NOT_FOUND."""
        device = self._engine.get(volume_id)
        if device is not None and device.kind == model.DeviceKind.VOLUME:
            return device
        if mountinfo.at(path) is not None:
            raise errors.NotFound(
                f"volume {volume_id!r} does not exist; not touching what is mounted at {path}"
            )
        return None

    def _device(self, volume_id: str) -> model.Device:
        device = self._engine.get(volume_id)
        if device is None or device.kind != model.DeviceKind.VOLUME:
            raise errors.NotFound(f"volume {volume_id!r} does not exist")
        return device

    @staticmethod
    def _is_device(device: model.Device, mount: mountinfo.Mount, path: str) -> bool:
        """Whether `mount` (at `path`) shows this device: its filesystem, or its node (or the node of
        one of its read-only views) bound there."""
        nodes = _nodes(device)
        if mount.dev in nodes:
            return True
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return False
        return stat.S_ISBLK(st.st_mode) and st.st_rdev in nodes

    @staticmethod
    def _is_device_node(device: model.Device, st: os.stat_result) -> bool:
        """Whether `st` (of a block device node, or of a bind of one) is this device's node or the
        node of one of its read-only views."""
        return st.st_rdev in _nodes(device)

    def _unmount_own(self, volume_id: str, path: str, *, deadline: deadline_mod.Deadline) -> None:
        """Unmount every (stacked) mount of this volume at `path`; refuse to touch anything else.

        The volume id is the caller's claim that the mount is ours: a path holding another volume
        (a CO mixing up its bookkeeping) or something that is not a volume of ours at all is left
        mounted, as unmounting it would pull storage from under whoever uses it.
        """
        while (mount := mountinfo.at(path)) is not None:
            device = self._engine.get(volume_id)
            if device is None or not self._is_device(device, mount, path):
                raise errors.FailedPrecondition(
                    f"{path} has {mount.source or mount.fs_type} mounted, which is not volume "
                    f"{volume_id}: not unmounting it"
                )
            filesystem.unmount(path, deadline=deadline)

    def _check_same_device(self, volume_id: str, mount: mountinfo.Mount, path: str) -> None:
        device = self._engine.get(volume_id)
        if device is None or not self._is_device(device, mount, path):
            raise errors.AlreadyExists(f"{path} already has another device mounted ({mount.source})")


def _path(device: model.Device) -> str:
    if not device.path:
        raise errors.Internal(f"activated {device.name} but the engine reports no device path")
    return device.path


def _resolve(path: str, field: str) -> str:
    """`path` with symlinks in its parent resolved; a path that is itself a symlink is refused.

    mountinfo shows resolved mount points, so the parent must be resolved for the node to recognise
    its own mounts (kubelet's root dir is often a symlink). The last component is the one the CO or
    this plugin creates; a symlink there would send a mount (or an unlink) somewhere else entirely.
    """
    resolved = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
    if os.path.islink(resolved):
        raise errors.InvalidArgument(f"{field} {path!r} is a symbolic link")
    return resolved


def _forced_read_only(mount: mountinfo.Mount) -> bool:
    """Whether the filesystem went read-only by itself (an IO or corruption error) while this mount
    asked for read-write: ext4 (errors=remount-ro) marks its superblock ro, or `emergency_ro` on
    newer kernels."""
    return not mount.read_only and ("ro" in mount.super_options or "emergency_ro" in mount.super_options)


def _nodes(device: model.Device) -> dict[int, set[str]]:
    """The device numbers that are this device: its own and its read-only views', each with the
    roots a bind of its node shows in mountinfo (the node's path inside /dev)."""
    if not device.path:
        return {}
    try:
        rdev = os.stat(device.path).st_rdev
    except FileNotFoundError:
        return {}
    real = os.path.realpath(device.path)
    nodes = {
        rdev: {"/" + os.path.basename(real), real.removeprefix("/dev"), device.path.removeprefix("/dev")}
    }
    for v in blockview.views_of(device.path):
        nodes[v.rdev] = {"/" + os.path.basename(v.path)}
    return nodes


def _mounted_elsewhere(device: model.Device, path: str) -> list[str]:
    """Mount points other than `path` showing this device: its filesystem, or its node (or one of
    its read-only views' nodes) bound there.

    A bind of the device node does not hold the device open, so only mountinfo can tell that a
    block volume is still published. Such a bind shows the node's path inside /dev as its root.
    """
    nodes = _nodes(device)
    roots = set().union(*nodes.values()) if nodes else set()
    found: list[str] = []
    for m in mountinfo.read():
        if m.mount_point == path:
            continue
        if m.dev in nodes:
            found.append(m.mount_point)
        elif m.root in roots:
            with contextlib.suppress(OSError):
                st = os.stat(m.mount_point)
                if stat.S_ISBLK(st.st_mode) and st.st_rdev in nodes:
                    found.append(m.mount_point)
    return found


def _view_bound_elsewhere(view: str, target: str) -> list[str]:
    """Mount points other than `target` where the node of the read-only view `view` is bound
    (a bind shows the node's path inside /dev as its root). The exclusive open that guards a detach
    does not see these: a bind of a device node does not hold the device open."""
    nodes = {v.rdev: "/" + os.path.basename(v.path) for v in blockview.views() if v.label == view}
    if not nodes:
        return []
    found: list[str] = []
    for m in mountinfo.read():
        if m.mount_point == target or m.root not in nodes.values():
            continue
        with contextlib.suppress(OSError):
            st = os.stat(m.mount_point)
            if stat.S_ISBLK(st.st_mode) and st.st_rdev in nodes:
                found.append(m.mount_point)
    return found


def _shows_view(target: str, view: str) -> bool:
    """Whether the block device node at `target` is the read-only view labelled `view`."""
    try:
        rdev = os.stat(target).st_rdev
    except FileNotFoundError:
        return False
    return any(v.rdev == rdev for v in blockview.views() if v.label == view)


def _remove_made_target(path: str) -> None:
    """Remove the target publish made at `path`, and nothing else.

    CSI has the plugin remove the target it created; the node keeps no list of those, and a restart
    must not forget them, so the thing itself is the proof. Publish makes an empty directory (a
    mount volume's mount point) or an empty regular file (a block volume's bind target); a target
    is removed only when it is exactly that and nothing is mounted on it any more (the caller has
    unmounted this volume, and refused to unmount anything else). Anything else there (a file with
    content, a directory with entries, a fifo, a socket) was not made by publish and stays:
    the volume is not published there, so the call still succeeds.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if mountinfo.at(path) is not None:
        return
    try:
        if stat.S_ISDIR(st.st_mode):
            os.rmdir(path)  # refuses, atomically, a directory that is not empty
        elif stat.S_ISREG(st.st_mode) and st.st_size == 0:
            os.unlink(path)
        else:
            log.warning("event=target_kept path=%s reason=not_made_by_publish", path)
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
            raise errors.Internal(f"remove target {path}: {os.strerror(exc.errno or 0)}") from exc
        if exc.errno != errno.ENOENT:
            log.warning("event=target_kept path=%s reason=not_empty", path)


def _make_dir(path: str) -> None:
    """A mount volume is staged and published on a directory; anything else already there is the
    caller's mistake (FAILED_PRECONDITION), never ours to remove."""
    if os.path.lexists(path) and not os.path.isdir(path):
        raise errors.FailedPrecondition(f"{path} exists and is not a directory")
    os.makedirs(path, exist_ok=True)


def _make_file(target: str) -> None:
    """A block volume is published by binding the device node onto a plain file."""
    if os.path.isdir(target):
        if os.listdir(target):
            raise errors.FailedPrecondition(f"{target} is a non-empty directory")
        os.rmdir(target)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(target, "a", encoding="utf-8"):
        pass
