"""Volumes and snapshots as the CSI Controller sees them, on top of the pool engine.

Every create starts with "does it exist, and is it compatible?" (so retries return the same object
and a different request under the same name gets ALREADY_EXISTS); every delete treats an absent
device as done. Locking is the engine's: it holds a per-name lock for each mutation and answers a
second caller with OperationPending (ABORTED), so nothing here takes a lock of its own. Reads
(get/list/capacity) take no lock: they see one consistent record each and a list is a snapshot.

Placement. Standalone: one node, its engine; a request whose topology excludes it is refused. In
Kubernetes mode (`Settings.node_id` None, `nodes` given) volumes live on many nodes: a new volume goes
to the first preferred node its requisite topology allows, a clone, restore or snapshot to its
source's node, and each node's capacity and overprovisioning are that node's engine's.
"""

from __future__ import annotations

import builtins
import dataclasses
import enum
from collections.abc import Callable, Mapping
from typing import Protocol

from csi_thin import deadline as deadline_mod
from csi_thin import errors, model
from csi_thin.controller import naming, paging
from csi_thin.pool import health

TiB = 1024 * model.GiB


class Engine(Protocol):
    """The part of `csi_thin.pool.engine.PoolEngine` the controller uses."""

    def create_volume(
        self,
        name: str,
        size_bytes: int,
        *,
        deadline: deadline_mod.Deadline,
        attributes: Mapping[str, str] | None = None,
    ) -> model.Device: ...
    def create_snapshot(self, name: str, source: str, *, deadline: deadline_mod.Deadline) -> model.Device: ...
    def clone(
        self,
        name: str,
        source: str,
        size_bytes: int,
        *,
        deadline: deadline_mod.Deadline,
        attributes: Mapping[str, str] | None = None,
    ) -> model.Device: ...
    def delete(self, name: str, *, deadline: deadline_mod.Deadline) -> None: ...
    def grow(self, name: str, size_bytes: int, *, deadline: deadline_mod.Deadline) -> model.Device: ...
    def get(self, name: str) -> model.Device | None: ...
    def list(self, *, kind: model.DeviceKind | None = None) -> list[model.Device]: ...
    def page(self, kind: model.DeviceKind, *, after: str, limit: int) -> builtins.list[model.Device]:
        """Up to `limit` devices of `kind` (0: all) named after `after`, in name order."""
        ...

    def volume_bytes(self) -> int:
        """Sum of the sizes of the volumes in any state: what overprovisioning counts."""
        ...

    def status(self, *, deadline: deadline_mod.Deadline) -> model.PoolStatus: ...
    def space_thresholds(self, *, deadline: deadline_mod.Deadline) -> model.Thresholds:
        """The used ratios above which this pool refuses new devices: its node's own configuration."""
        ...


class AccessType(enum.StrEnum):
    MOUNT = "mount"
    BLOCK = "block"


@dataclasses.dataclass(frozen=True)
class Settings:
    #: this node (standalone); None when volumes may go to any node (Kubernetes mode)
    node_id: str | None
    block_size: int
    #: provisioned volume bytes may reach this multiple of the pool's data size (thin provisioning)
    overprovision_ratio: float = 10.0
    #: size of a volume whose request names no capacity
    default_size: int = model.GiB
    #: the largest volume: a request above it is OUT_OF_RANGE rather than an attempt
    max_volume_bytes: int = 256 * TiB


@dataclasses.dataclass(frozen=True)
class CapacityRange:
    """CSI's capacity range; 0 means "not set" for either bound (as in the protobuf)."""

    required: int = 0
    limit: int = 0


@dataclasses.dataclass(frozen=True)
class ContentSource:
    kind: naming.IdKind
    id: str


@dataclasses.dataclass(frozen=True)
class VolumeRequest:
    name: str
    capacity: CapacityRange
    source: ContentSource | None = None
    #: node ids the volume may live on (None: no requirement)
    allowed_nodes: frozenset[str] | None = None
    #: node ids in the order the caller prefers them (CSI's preferred topology)
    preferred_nodes: tuple[str, ...] = ()
    #: the smallest size the requested filesystem can be made on (0: no minimum)
    min_bytes: int = 0
    #: what the volume is made for (access type, fs type): kept on the device, and a repeated create
    #: asking for something else is ALREADY_EXISTS
    attributes: Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Capacity:
    available_bytes: int
    maximum_volume_bytes: int


@dataclasses.dataclass(frozen=True)
class VolumeHealth:
    volume: model.Device
    #: empty: no adverse condition is known
    issues: tuple[health.Issue, ...]


@dataclasses.dataclass(frozen=True)
class Page:
    devices: list[model.Device]
    next_token: str


@dataclasses.dataclass(frozen=True)
class HealthPage:
    entries: list[VolumeHealth]
    next_token: str


def round_up(value: int, block: int) -> int:
    return -(-value // block) * block


def choose_size(rng: CapacityRange, settings: Settings, *, at_least: int = 0) -> int:
    """The size to allocate for a capacity range: a multiple of the pool block size inside it.

    `at_least` raises the choice (a clone is never smaller than its source) while it fits the limit.
    """
    if rng.required < 0 or rng.limit < 0:
        raise errors.InvalidArgument("capacity_range: required_bytes and limit_bytes must not be negative")
    if rng.limit and rng.limit < rng.required:
        raise errors.InvalidArgument(
            f"capacity_range: limit_bytes {rng.limit} is below required_bytes {rng.required}"
        )
    if rng.required > settings.max_volume_bytes:  # CSI: a capacity we cannot provide is OUT_OF_RANGE
        raise errors.OutOfRange(
            f"capacity_range: required_bytes {rng.required} exceeds the driver maximum "
            f"{settings.max_volume_bytes}"
        )
    bs = settings.block_size
    want = rng.required or (min(settings.default_size, rng.limit) if rng.limit else settings.default_size)
    size = round_up(max(want, at_least), bs)
    if rng.limit and size > rng.limit:
        size = rng.limit // bs * bs
    if size == 0 or size < max(rng.required, at_least):
        raise errors.OutOfRange(
            f"no multiple of the pool block size {bs} fits capacity_range "
            f"[{rng.required}, {rng.limit or 'unbounded'}]"
            + (
                f" and the minimum of {at_least} bytes (source size or filesystem minimum)"
                if at_least
                else ""
            )
        )
    return min(size, settings.max_volume_bytes // bs * bs)


class InvalidToken(errors.CsiThinError):
    """CSI answers a starting_token it did not issue with ABORTED."""

    code = "ABORTED"


class Provisioner:
    def __init__(
        self, *, engine: Engine, settings: Settings, nodes: Callable[[str], Engine] | None = None
    ) -> None:
        """`engine` finds devices by name; `nodes(node)` is the engine of one node (Kubernetes mode:
        where volumes are created, and whose capacity counts). Standalone: `engine` is both."""
        if (settings.node_id is None) != (nodes is not None):
            raise errors.Internal("Provisioner: give either settings.node_id (one node) or nodes (many)")
        self._engine = engine
        self._settings = settings
        self._nodes = nodes

    @property
    def settings(self) -> Settings:
        return self._settings

    # -- volumes ---------------------------------------------------------------------------------

    def create_volume(self, req: VolumeRequest, *, deadline: deadline_mod.Deadline) -> model.Device:
        name = naming.device_name(req.name, naming.IdKind.VOLUME)
        source = self._source_device(req.source)
        at_least = max(source.size_bytes if source else 0, req.min_bytes)
        size = choose_size(req.capacity, self._settings, at_least=at_least)
        existing = self._engine.get(name)
        if existing is not None:
            self._existing_volume(existing, req, source)
            if existing.state == model.DeviceState.READY:
                return existing
            # still being created: ask again (the pool engine answers ABORTED while its create runs;
            # the CR engine waits for the node's verdict on the object the first call made)
            engine = self._on(existing.node)
        else:
            node = self._place(req, source)
            engine = self._on(node)
            self._check_overprovision(size, engine, deadline=deadline)
        if source is None:
            return engine.create_volume(name, size, deadline=deadline, attributes=req.attributes)
        return engine.clone(name, source.name, size, deadline=deadline, attributes=req.attributes)

    def delete_volume(self, volume_id: str, *, deadline: deadline_mod.Deadline) -> None:
        if naming.is_own_id(volume_id, naming.IdKind.VOLUME):
            self._engine.delete(volume_id, deadline=deadline)

    def get_volume(self, volume_id: str) -> model.Device:
        return self._get(volume_id, naming.IdKind.VOLUME)

    def list_volumes(self, *, max_entries: int, token: str) -> Page:
        # one page from the engine (its index), not every volume: the same cost on any page
        start = paging.start_after(token)
        if start is None and token:
            raise InvalidToken(f"starting_token {token!r} was not issued by this driver")
        limit = max_entries + 1 if max_entries > 0 else 0  # one more tells whether a page follows
        devices = self._engine.page(model.DeviceKind.VOLUME, after=start or "", limit=limit)
        return self._page(devices, max_entries, "")

    def expand_volume(
        self, volume_id: str, rng: CapacityRange, *, deadline: deadline_mod.Deadline
    ) -> model.Device:
        device = self.get_volume(volume_id)
        size = choose_size(rng, self._settings)
        if device.size_bytes >= rng.required:  # already there (a retry, or a no-op): never shrink
            return device
        engine = self._on(device.node)
        self._check_overprovision(size - device.size_bytes, engine, deadline=deadline)
        return engine.grow(volume_id, size, deadline=deadline)

    def volume_health(self, volume_id: str, *, deadline: deadline_mod.Deadline) -> VolumeHealth:
        """ControllerGetVolumeHealth: the volume's health as its record and its pool show it."""
        return self._healths([self.get_volume(volume_id)], deadline=deadline)[0]

    def list_volume_health(
        self, *, max_entries: int, token: str, deadline: deadline_mod.Deadline
    ) -> HealthPage:
        """ControllerListVolumeHealth: the volumes with an adverse condition (the spec lists only
        those), paged like ListVolumes: by name, a token names the last one returned."""
        healths = self._healths(self._engine.list(kind=model.DeviceKind.VOLUME), deadline=deadline)
        unhealthy = {h.volume.name: h for h in healths if h.issues}
        page = self._page([h.volume for h in unhealthy.values()], max_entries, token)
        return HealthPage(entries=[unhealthy[d.name] for d in page.devices], next_token=page.next_token)

    def _healths(self, devices: list[model.Device], *, deadline: deadline_mod.Deadline) -> list[VolumeHealth]:
        """The health of each volume, reading each node's pool status and thresholds once. A pool
        whose status cannot be read is the answer (every volume on it inaccessible), not an error;
        except in Kubernetes mode, where what cannot be read is the API server (see below)."""
        pools: dict[str | None, tuple[model.PoolStatus, model.Thresholds] | health.Issue] = {}
        out: list[VolumeHealth] = []
        for d in devices:
            if d.node not in pools:
                engine = self._on(d.node)
                try:
                    pools[d.node] = (
                        engine.status(deadline=deadline),
                        engine.space_thresholds(deadline=deadline),
                    )
                except errors.NodeSilent as exc:
                    pools[d.node] = health.unreported(exc.message)
                except errors.Unavailable as exc:
                    if self._nodes is not None:
                        # Kubernetes mode reads the pool from its ThinPool object: UNAVAILABLE is
                        # the API server not answering, which says nothing about the volumes (the
                        # RPC fails and the CO asks again; the node reports a pool it cannot read)
                        raise
                    pools[d.node] = health.unavailable(exc.message)
            pool = pools[d.node]
            issues = (pool,) if isinstance(pool, health.Issue) else health.volume(d, *pool)
            out.append(VolumeHealth(volume=d, issues=issues))
        return out

    def capacity(self, *, node_id: str | None, deadline: deadline_mod.Deadline) -> Capacity:
        """GetCapacity: the smaller of the thin headroom (overprovision ratio x data size - bytes
        provisioned to volumes) and the physical headroom (data size x the data threshold - data used,
        i.e. free space less the reserve above the threshold, where new devices are refused anyway).
        The largest single volume is bounded by the thin headroom only: it is allocated lazily."""
        if self._nodes is None and node_id is not None and node_id != self._settings.node_id:
            return Capacity(available_bytes=0, maximum_volume_bytes=0)
        if self._nodes is not None and node_id is None:
            # Kubernetes mode: capacity is per node (the external-provisioner asks per topology
            # segment); a volume cannot span nodes, so no single number describes "anywhere"
            return Capacity(available_bytes=0, maximum_volume_bytes=0)
        engine = self._on(node_id)
        try:
            status = engine.status(deadline=deadline)
        except errors.NodeSilent:
            # its agent is down: no capacity, so the scheduler sends no new claims to it
            return Capacity(available_bytes=0, maximum_volume_bytes=0)
        thresholds = engine.space_thresholds(deadline=deadline)
        # above a threshold the engine refuses every new device; maximum_volume_size must say so too,
        # as the Kubernetes scheduler prefers it to available_capacity when both are set
        if (
            not status.healthy
            or status.data_used_ratio > thresholds.data
            or status.metadata_used_ratio > thresholds.metadata
        ):
            return Capacity(available_bytes=0, maximum_volume_bytes=0)
        bs = self._settings.block_size
        logical = int(self._settings.overprovision_ratio * status.data_total_bytes) - _provisioned(engine)
        physical = int(status.data_total_bytes * thresholds.data) - status.data_used_bytes
        logical = max(0, min(logical, self._settings.max_volume_bytes)) // bs * bs
        return Capacity(
            available_bytes=max(0, min(logical, physical)) // bs * bs, maximum_volume_bytes=logical
        )

    # -- snapshots -------------------------------------------------------------------------------

    def create_snapshot(self, name: str, source_id: str, *, deadline: deadline_mod.Deadline) -> model.Device:
        snap = naming.device_name(name, naming.IdKind.SNAPSHOT)
        existing = self._engine.get(snap)
        if existing is not None:
            if existing.kind != model.DeviceKind.SNAPSHOT or existing.origin != source_id:
                raise errors.AlreadyExists(f"snapshot {name!r} exists with another source volume")
            if existing.state != model.DeviceState.CREATING:
                return _ready(existing)
            # still being created: ask again (as for volumes)
        source = self.get_volume(source_id)
        return self._engine.create_snapshot(snap, source.name, deadline=deadline)

    def delete_snapshot(self, snapshot_id: str, *, deadline: deadline_mod.Deadline) -> None:
        if naming.is_own_id(snapshot_id, naming.IdKind.SNAPSHOT):
            device = self._engine.get(snapshot_id)
            if device is not None and device.group is not None:
                # the spec: a member of a group snapshot is deleted with its group, never alone
                raise errors.InvalidArgument(
                    f"snapshot {snapshot_id!r} is part of volume group snapshot {device.group!r}: "
                    "delete the group (DeleteVolumeGroupSnapshot)"
                )
            self._engine.delete(snapshot_id, deadline=deadline)

    def get_snapshot(self, snapshot_id: str) -> model.Device:
        return self._get(snapshot_id, naming.IdKind.SNAPSHOT)

    def list_snapshots(self, *, snapshot_id: str, source_id: str, max_entries: int, token: str) -> Page:
        snaps = self._engine.list(kind=model.DeviceKind.SNAPSHOT)
        if snapshot_id:
            snaps = [s for s in snaps if s.name == snapshot_id]
        if source_id:
            snaps = [s for s in snaps if s.origin == source_id]
        return self._page(snaps, max_entries, token)

    # -- helpers ---------------------------------------------------------------------------------

    def _get(self, device_id: str, kind: naming.IdKind) -> model.Device:
        wanted = model.DeviceKind.VOLUME if kind == naming.IdKind.VOLUME else model.DeviceKind.SNAPSHOT
        device = self._engine.get(device_id) if naming.is_own_id(device_id, kind) else None
        if device is None or device.kind != wanted:
            raise errors.NotFound(f"{wanted.value} {device_id!r} does not exist")
        return device

    def _source_device(self, source: ContentSource | None) -> model.Device | None:
        if source is None:
            return None
        return self._get(source.id, source.kind)

    def _on(self, node: str | None) -> Engine:
        """The engine of the node that holds (or will hold) a device."""
        if self._nodes is None:
            return self._engine
        if node is None:
            raise errors.Internal("Kubernetes mode: a device without a node")
        return self._nodes(node)

    def _place(self, req: VolumeRequest, source: model.Device | None) -> str | None:
        """The node for a new volume: its source's, else the first preferred node the requisite
        topology allows, else the first allowed one. Standalone: this node, if allowed."""
        allowed = req.allowed_nodes
        if self._nodes is None:
            node = self._settings.node_id
            if allowed is not None and node not in allowed:
                raise errors.ResourceExhausted(
                    f"accessibility requirements name no segment of this node ({node})"
                )
            return node
        if source is not None:
            if allowed is not None and source.node not in allowed:
                raise errors.ResourceExhausted(
                    f"the content source lives on node {source.node}, which the accessibility "
                    "requirements do not allow"
                )
            return source.node
        for node in req.preferred_nodes:
            if allowed is None or node in allowed:
                return node
        if allowed:
            return sorted(allowed)[0]
        raise errors.InvalidArgument(
            "accessibility_requirements must name a node (topology key csi-thin.io/node): "
            "volumes are node-local"
        )

    def _existing_volume(
        self, existing: model.Device, req: VolumeRequest, source: model.Device | None
    ) -> None:
        rng = req.capacity
        fits = existing.size_bytes >= rng.required and (not rng.limit or existing.size_bytes <= rng.limit)
        same_source = existing.origin == (source.name if source else None)
        if existing.kind != model.DeviceKind.VOLUME or not fits or not same_source:
            raise errors.AlreadyExists(
                f"volume {req.name!r} exists with another size ({existing.size_bytes}) or content source"
            )
        if existing.attributes != model.attributes(req.attributes):
            raise errors.AlreadyExists(
                f"volume {req.name!r} exists for {dict(existing.attributes)}, not for {dict(req.attributes)}"
            )
        if existing.state not in (model.DeviceState.READY, model.DeviceState.CREATING):
            raise errors.OperationPending(f"volume {req.name!r} is {existing.state.value}")

    def _check_overprovision(self, extra: int, engine: Engine, *, deadline: deadline_mod.Deadline) -> None:
        status = engine.status(deadline=deadline)
        limit = int(self._settings.overprovision_ratio * status.data_total_bytes)
        provisioned = _provisioned(engine)
        if provisioned + extra > limit:
            raise errors.ResourceExhausted(
                f"provisioning {extra} more bytes would exceed {self._settings.overprovision_ratio}x the "
                f"pool's data size ({provisioned} of {limit} bytes provisioned)"
            )

    @staticmethod
    def _page(devices: list[model.Device], max_entries: int, token: str) -> Page:
        names = sorted(devices, key=lambda d: d.name)
        start = paging.start_after(token)
        if start is None and token:
            raise InvalidToken(f"starting_token {token!r} was not issued by this driver")
        if start is not None:
            names = [d for d in names if d.name > start]
        if max_entries <= 0 or len(names) <= max_entries:
            return Page(devices=names, next_token="")
        page = names[:max_entries]
        return Page(devices=page, next_token=paging.token_after(page[-1].name))


def _provisioned(engine: Engine) -> int:
    """What writable devices may grow to: volumes and containerd's active and view snapshots on
    the same pool (writable thin devices too; the CR engine of Kubernetes mode lists none). A
    committed layer, like a CSI snapshot, is read-only for good: its blocks count in data used."""
    return engine.volume_bytes()


def _ready(device: model.Device) -> model.Device:
    if device.state != model.DeviceState.READY:
        raise errors.OperationPending(f"{device.kind.value} {device.name!r} is {device.state.value}")
    return device
