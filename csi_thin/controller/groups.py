"""Volume group snapshots as the CSI GroupController sees them, on top of the pool engine.

A group snapshot is the pool engine's group (csi_thin.pool.engine.create_group_snapshot): one
snapshot per source volume, all of one instant, each an ordinary snapshot that carries its group's
id (ListSnapshots, GetSnapshot and CreateVolume from it treat it like any other; DeleteSnapshot
refuses it, as the spec asks: a member goes with its group). The group's id is `naming`'s `g-...`
form of its CSI name, each member's the hashed name of (group id, volume id), so a retried create
finds what the first attempt made.

Locking is the engine's (a per-name claim on the group and every name it touches: a second caller
gets ABORTED). Standalone only for now: a group's volumes all live in this node's one pool.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol

from csi_thin import deadline as deadline_mod
from csi_thin import errors, model
from csi_thin.controller import naming


class GroupEngine(Protocol):
    """The part of `csi_thin.pool.engine.PoolEngine` the group snapshots use."""

    def get(self, name: str) -> model.Device | None: ...
    def create_group_snapshot(
        self, group: str, members: Sequence[tuple[str, str]], *, deadline: deadline_mod.Deadline
    ) -> list[model.Device]: ...
    def delete_group_snapshot(self, group: str, *, deadline: deadline_mod.Deadline) -> None: ...
    def get_group(self, group: str) -> list[model.Device]: ...


@dataclasses.dataclass(frozen=True)
class GroupSnapshot:
    group_id: str
    snapshots: tuple[model.Device, ...]

    @property
    def created_at(self) -> float:
        """When the group was taken (every member carries the same instant)."""
        return min(d.created_at for d in self.snapshots)

    @property
    def ready(self) -> bool:
        return all(d.state == model.DeviceState.READY for d in self.snapshots)


class GroupSnapshots:
    def __init__(self, *, engine: GroupEngine) -> None:
        self._engine = engine

    def create(
        self, name: str, source_ids: Sequence[str], *, deadline: deadline_mod.Deadline
    ) -> GroupSnapshot:
        """CreateVolumeGroupSnapshot: the group of these volumes under this name (the same group
        again for the same name and volumes; ALREADY_EXISTS for the same name and other volumes)."""
        if not source_ids:
            raise errors.InvalidArgument("source_volume_ids is required")
        if len(set(source_ids)) != len(source_ids):
            raise errors.InvalidArgument("source_volume_ids names a volume twice")
        group_id = naming.device_name(name, naming.IdKind.GROUP)
        # Does it exist? A group once cut is returned (or refused as incompatible) by the engine
        # whatever became of its sources since: a retry after a source was deleted gets the group.
        made = bool(self._engine.get_group(group_id))
        for source in [] if made else source_ids:
            device = self._engine.get(source) if naming.is_own_id(source, naming.IdKind.VOLUME) else None
            if device is None or device.kind != model.DeviceKind.VOLUME:
                raise errors.NotFound(
                    f"source volume {source!r} does not exist "
                    "(a group's volumes must all live in this node's pool)"
                )
        members = [(naming.group_member_name(group_id, source), source) for source in source_ids]
        snapshots = self._engine.create_group_snapshot(group_id, members, deadline=deadline)
        return GroupSnapshot(group_id=group_id, snapshots=tuple(snapshots))

    def get(self, group_id: str, snapshot_ids: Sequence[str]) -> GroupSnapshot:
        """GetVolumeGroupSnapshot: NOT_FOUND when no such group; snapshot_ids, when given, must be
        exactly its members (INVALID_ARGUMENT otherwise)."""
        group = self._group(group_id)
        if not group.snapshots:
            raise errors.NotFound(f"volume group snapshot {group_id!r} does not exist")
        have = {d.name for d in group.snapshots}
        if snapshot_ids and set(snapshot_ids) != have:
            raise errors.InvalidArgument(
                f"snapshot_ids {sorted(snapshot_ids)} are not the members of group snapshot "
                f"{group_id!r}: {sorted(have)}"
            )
        return group

    def delete(self, group_id: str, snapshot_ids: Sequence[str], *, deadline: deadline_mod.Deadline) -> None:
        """DeleteVolumeGroupSnapshot: every member, absent is done. snapshot_ids, when given, must
        name every member left and nothing else that exists (a delete cut short by a crash leaves
        fewer members: the repeated call with the full list is no mismatch)."""
        group = self._group(group_id)
        have = {d.name for d in group.snapshots}
        if snapshot_ids and have:
            given = set(snapshot_ids)
            others = sorted(s for s in given - have if self._engine.get(s) is not None)
            if not have <= given or others:
                raise errors.InvalidArgument(
                    f"snapshot_ids {sorted(given)} do not match the members of group snapshot "
                    f"{group_id!r}: {sorted(have)}"
                )
        if have:
            self._engine.delete_group_snapshot(group_id, deadline=deadline)

    def _group(self, group_id: str) -> GroupSnapshot:
        if not naming.is_own_id(group_id, naming.IdKind.GROUP):
            return GroupSnapshot(group_id=group_id, snapshots=())
        return GroupSnapshot(group_id=group_id, snapshots=tuple(self._engine.get_group(group_id)))
