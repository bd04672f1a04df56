"""Typed CustomResources: ThinVolume, ThinSnapshot, ThinGroupSnapshot, ThinPool (group csi-thin.io,
v1alpha1).

The API server speaks dicts; this module is the edge where they become frozen dataclasses (and back).
A malformed object (a field of the wrong type) is `errors.Internal` naming the object: the CRD's
structural schema makes that a bug, not an input error.

Names: a CR's name IS the volume, snapshot or group snapshot id (`v-pvc-...`, `s-snapshot-...`,
`vh-<hash>`, `g-...`): the ids this driver hands out are already DNS labels, so the mapping is the
identity, readable in `kubectl get thinvolumes`, and a retried CreateVolume finds the CR its first
attempt made.
"""

from __future__ import annotations

import calendar
import dataclasses
import enum
import time
from collections.abc import Mapping
from typing import Any

from csi_thin import errors

GROUP = "csi-thin.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
#: held by the node agent from before a device is created until after it is deleted
FINALIZER = "csi-thin.io/device"
#: the label every CR carries with its node's name (printer columns and humans; selection is by field)
NODE_FIELD = "spec.nodeName"


class Kind(enum.StrEnum):
    VOLUME = "ThinVolume"
    SNAPSHOT = "ThinSnapshot"
    GROUP = "ThinGroupSnapshot"
    POOL = "ThinPool"

    @property
    def plural(self) -> str:
        return self.value.lower() + "s"


class Phase(enum.StrEnum):
    PENDING = "Pending"
    READY = "Ready"
    FAILED = "Failed"
    LOST = "Lost"
    DELETING = "Deleting"


class AccessType(enum.StrEnum):
    MOUNT = "mount"
    BLOCK = "block"


def _obj(raw: Any, what: str) -> Mapping[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise errors.Internal(f"{what}: expected an object, got {type(raw).__name__}")
    return raw


def _str(raw: Mapping[str, Any], key: str, what: str, default: str = "") -> str:
    value = raw.get(key, default)
    if value is None:
        return default
    if not isinstance(value, str):
        raise errors.Internal(f"{what}.{key}: expected a string")
    return value


def _int(raw: Mapping[str, Any], key: str, what: str, default: int = 0) -> int:
    value = raw.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise errors.Internal(f"{what}.{key}: expected an integer")
    return value


def _float(raw: Mapping[str, Any], key: str, what: str) -> float:
    value = raw.get(key)
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise errors.Internal(f"{what}.{key}: expected a number")
    return float(value)


#: the CRDs bound every status message to this many bytes (a longer one is refused with 422)
MESSAGE_BYTES = 4096


def bounded(message: str) -> str:
    """A status message the API server accepts: longer ones are cut (at a character boundary)."""
    raw = message.encode()
    if len(raw) <= MESSAGE_BYTES:
        return message
    return raw[: MESSAGE_BYTES - 16].decode(errors="ignore") + " [... cut]"


@dataclasses.dataclass(frozen=True)
class Meta:
    name: str
    resource_version: str = ""
    generation: int = 0
    uid: str = ""
    finalizers: tuple[str, ...] = ()
    deleting: bool = False  # metadata.deletionTimestamp is set
    created: str = ""  # metadata.creationTimestamp (RFC 3339)

    @classmethod
    def from_dict(cls, raw: Any) -> Meta:
        m = _obj(raw, "metadata")
        return cls(
            name=_str(m, "name", "metadata"),
            resource_version=_str(m, "resourceVersion", "metadata"),
            generation=_int(m, "generation", "metadata"),
            uid=_str(m, "uid", "metadata"),
            finalizers=tuple(str(f) for f in m.get("finalizers") or ()),
            deleting=m.get("deletionTimestamp") is not None,
            created=_str(m, "creationTimestamp", "metadata"),
        )


@dataclasses.dataclass(frozen=True)
class Condition:
    type: str
    status: str  # "True" | "False" | "Unknown"
    reason: str
    message: str = ""
    observed_generation: int = 0
    last_transition_time: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "status": self.status,
            "reason": self.reason,
            "message": bounded(self.message),
            "observedGeneration": self.observed_generation,
            "lastTransitionTime": self.last_transition_time,
        }

    @classmethod
    def from_dict(cls, raw: Any) -> Condition:
        c = _obj(raw, "condition")
        return cls(
            type=_str(c, "type", "condition"),
            status=_str(c, "status", "condition"),
            reason=_str(c, "reason", "condition"),
            message=_str(c, "message", "condition"),
            observed_generation=_int(c, "observedGeneration", "condition"),
            last_transition_time=_str(c, "lastTransitionTime", "condition"),
        )


# ---- ThinVolume ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Source:
    """What a volume is made from: exactly one of a snapshot id or a volume id."""

    snapshot: str = ""
    volume: str = ""

    @property
    def name(self) -> str:
        return self.snapshot or self.volume


@dataclasses.dataclass(frozen=True)
class VolumeSpec:
    node_name: str
    pool: str
    size_bytes: int
    access_type: AccessType = AccessType.MOUNT
    fs_type: str = ""
    source: Source | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "nodeName": self.node_name,
            "pool": self.pool,
            "sizeBytes": self.size_bytes,
            "accessType": self.access_type.value,
        }
        if self.fs_type:
            out["fsType"] = self.fs_type
        if self.source is not None:
            out["source"] = (
                {"snapshot": self.source.snapshot} if self.source.snapshot else {"volume": self.source.volume}
            )
        return out

    @classmethod
    def from_dict(cls, raw: Any) -> VolumeSpec:
        s = _obj(raw, "spec")
        src = s.get("source")
        source = None
        if src is not None:
            o = _obj(src, "spec.source")
            source = Source(
                snapshot=_str(o, "snapshot", "spec.source"), volume=_str(o, "volume", "spec.source")
            )
        try:
            access = AccessType(_str(s, "accessType", "spec", AccessType.MOUNT.value))
        except ValueError as exc:
            raise errors.Internal(f"spec.accessType: {exc}") from exc
        return cls(
            node_name=_str(s, "nodeName", "spec"),
            pool=_str(s, "pool", "spec"),
            size_bytes=_int(s, "sizeBytes", "spec"),
            access_type=access,
            fs_type=_str(s, "fsType", "spec"),
            source=source,
        )


@dataclasses.dataclass(frozen=True)
class VolumeStatus:
    phase: Phase = Phase.PENDING
    code: str = ""  # the gRPC status code name of a failure ("RESOURCE_EXHAUSTED", ...)
    message: str = ""
    size_bytes: int = 0
    device_id: int = 0
    observed_generation: int = 0
    created_at: float = 0.0  # unix seconds of the device's creation
    conditions: tuple[Condition, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "phase": self.phase.value,
            "code": self.code,
            "message": bounded(self.message),
            "sizeBytes": self.size_bytes,
            "deviceId": self.device_id,
            "observedGeneration": self.observed_generation,
            "createdAt": str(self.created_at),
            "conditions": [c.to_dict() for c in self.conditions],
        }

    @classmethod
    def from_dict(cls, raw: Any) -> VolumeStatus:
        s = _obj(raw, "status")
        try:
            phase = Phase(_str(s, "phase", "status", Phase.PENDING.value))
        except ValueError as exc:
            raise errors.Internal(f"status.phase: {exc}") from exc
        return cls(
            phase=phase,
            code=_str(s, "code", "status"),
            message=_str(s, "message", "status"),
            size_bytes=_int(s, "sizeBytes", "status"),
            device_id=_int(s, "deviceId", "status"),
            observed_generation=_int(s, "observedGeneration", "status"),
            created_at=float(_str(s, "createdAt", "status") or 0.0),
            conditions=tuple(Condition.from_dict(c) for c in s.get("conditions") or ()),
        )


@dataclasses.dataclass(frozen=True)
class ThinVolume:
    meta: Meta
    spec: VolumeSpec
    status: VolumeStatus = dataclasses.field(default_factory=VolumeStatus)

    kind = Kind.VOLUME

    @property
    def name(self) -> str:
        return self.meta.name

    @property
    def settled(self) -> bool:
        """The node has acted on the current spec (status describes this generation)."""
        return self.status.observed_generation >= self.meta.generation and self.status.phase in (
            Phase.READY,
            Phase.FAILED,
            Phase.LOST,
        )

    def body(self) -> dict[str, Any]:
        """The object to create (spec only: status is the node's)."""
        return {
            "apiVersion": API_VERSION,
            "kind": Kind.VOLUME.value,
            "metadata": {"name": self.meta.name},
            "spec": self.spec.to_dict(),
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ThinVolume:
        return cls(
            meta=Meta.from_dict(raw.get("metadata")),
            spec=VolumeSpec.from_dict(raw.get("spec")),
            status=VolumeStatus.from_dict(raw.get("status")),
        )


# ---- ThinSnapshot --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SnapshotSpec:
    node_name: str
    pool: str
    source_volume: str
    #: the ThinGroupSnapshot this snapshot is a member of ("": a snapshot of its own). A member's
    #: device is made by its group's one engine mutation, never by itself
    group: str = ""

    def to_dict(self) -> dict[str, Any]:
        out = {"nodeName": self.node_name, "pool": self.pool, "sourceVolume": self.source_volume}
        if self.group:
            out["group"] = self.group
        return out

    @classmethod
    def from_dict(cls, raw: Any) -> SnapshotSpec:
        s = _obj(raw, "spec")
        return cls(
            node_name=_str(s, "nodeName", "spec"),
            pool=_str(s, "pool", "spec"),
            source_volume=_str(s, "sourceVolume", "spec"),
            group=_str(s, "group", "spec"),
        )


@dataclasses.dataclass(frozen=True)
class SnapshotStatus:
    phase: Phase = Phase.PENDING
    ready_to_use: bool = False
    size_bytes: int = 0
    device_id: int = 0
    creation_time: float = 0.0  # unix seconds
    code: str = ""
    message: str = ""
    observed_generation: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "phase": self.phase.value,
            "readyToUse": self.ready_to_use,
            "sizeBytes": self.size_bytes,
            "deviceId": self.device_id,
            "creationTime": str(self.creation_time),
            "code": self.code,
            "message": bounded(self.message),
            "observedGeneration": self.observed_generation,
        }

    @classmethod
    def from_dict(cls, raw: Any) -> SnapshotStatus:
        s = _obj(raw, "status")
        try:
            phase = Phase(_str(s, "phase", "status", Phase.PENDING.value))
        except ValueError as exc:
            raise errors.Internal(f"status.phase: {exc}") from exc
        return cls(
            phase=phase,
            ready_to_use=bool(s.get("readyToUse", False)),
            size_bytes=_int(s, "sizeBytes", "status"),
            device_id=_int(s, "deviceId", "status"),
            creation_time=float(_str(s, "creationTime", "status") or 0.0),
            code=_str(s, "code", "status"),
            message=_str(s, "message", "status"),
            observed_generation=_int(s, "observedGeneration", "status"),
        )


@dataclasses.dataclass(frozen=True)
class ThinSnapshot:
    meta: Meta
    spec: SnapshotSpec
    status: SnapshotStatus = dataclasses.field(default_factory=SnapshotStatus)

    kind = Kind.SNAPSHOT

    @property
    def name(self) -> str:
        return self.meta.name

    @property
    def settled(self) -> bool:
        return self.status.observed_generation >= self.meta.generation and self.status.phase in (
            Phase.READY,
            Phase.FAILED,
            Phase.LOST,
        )

    def body(self) -> dict[str, Any]:
        return {
            "apiVersion": API_VERSION,
            "kind": Kind.SNAPSHOT.value,
            "metadata": {"name": self.meta.name},
            "spec": self.spec.to_dict(),
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ThinSnapshot:
        return cls(
            meta=Meta.from_dict(raw.get("metadata")),
            spec=SnapshotSpec.from_dict(raw.get("spec")),
            status=SnapshotStatus.from_dict(raw.get("status")),
        )


# ---- ThinGroupSnapshot ---------------------------------------------------------------------------


#: the most members a ThinGroupSnapshot holds (its CRD's spec.members maxItems)
MAX_GROUP_MEMBERS = 256


@dataclasses.dataclass(frozen=True)
class Member:
    """One snapshot of a group: its id (a ThinSnapshot of that name, `spec.group` naming the group)
    and the volume it is taken of."""

    snapshot: str
    source_volume: str

    def to_dict(self) -> dict[str, Any]:
        return {"snapshot": self.snapshot, "sourceVolume": self.source_volume}

    @classmethod
    def from_dict(cls, raw: Any) -> Member:
        m = _obj(raw, "spec.members[]")
        return cls(
            snapshot=_str(m, "snapshot", "spec.members[]"),
            source_volume=_str(m, "sourceVolume", "spec.members[]"),
        )


@dataclasses.dataclass(frozen=True)
class GroupSpec:
    """A crash-consistent snapshot of several volumes of one node: the node agent makes every
    member's device in ONE engine mutation (csi_thin.pool: create_group_snapshot)."""

    node_name: str
    pool: str
    members: tuple[Member, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "nodeName": self.node_name,
            "pool": self.pool,
            "members": [m.to_dict() for m in self.members],
        }

    @classmethod
    def from_dict(cls, raw: Any) -> GroupSpec:
        s = _obj(raw, "spec")
        return cls(
            node_name=_str(s, "nodeName", "spec"),
            pool=_str(s, "pool", "spec"),
            members=tuple(Member.from_dict(m) for m in s.get("members") or ()),
        )


@dataclasses.dataclass(frozen=True)
class GroupStatus:
    phase: Phase = Phase.PENDING
    ready_to_use: bool = False
    creation_time: float = 0.0  # unix seconds: the instant every member was cut
    code: str = ""
    message: str = ""
    observed_generation: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "phase": self.phase.value,
            "readyToUse": self.ready_to_use,
            "creationTime": str(self.creation_time),
            "code": self.code,
            "message": bounded(self.message),
            "observedGeneration": self.observed_generation,
        }

    @classmethod
    def from_dict(cls, raw: Any) -> GroupStatus:
        s = _obj(raw, "status")
        try:
            phase = Phase(_str(s, "phase", "status", Phase.PENDING.value))
        except ValueError as exc:
            raise errors.Internal(f"status.phase: {exc}") from exc
        return cls(
            phase=phase,
            ready_to_use=bool(s.get("readyToUse", False)),
            creation_time=float(_str(s, "creationTime", "status") or 0.0),
            code=_str(s, "code", "status"),
            message=_str(s, "message", "status"),
            observed_generation=_int(s, "observedGeneration", "status"),
        )


@dataclasses.dataclass(frozen=True)
class ThinGroupSnapshot:
    meta: Meta
    spec: GroupSpec
    status: GroupStatus = dataclasses.field(default_factory=GroupStatus)

    kind = Kind.GROUP

    @property
    def name(self) -> str:
        return self.meta.name

    @property
    def settled(self) -> bool:
        return self.status.observed_generation >= self.meta.generation and self.status.phase in (
            Phase.READY,
            Phase.FAILED,
            Phase.LOST,
        )

    def body(self) -> dict[str, Any]:
        return {
            "apiVersion": API_VERSION,
            "kind": Kind.GROUP.value,
            "metadata": {"name": self.meta.name},
            "spec": self.spec.to_dict(),
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ThinGroupSnapshot:
        return cls(
            meta=Meta.from_dict(raw.get("metadata")),
            spec=GroupSpec.from_dict(raw.get("spec")),
            status=GroupStatus.from_dict(raw.get("status")),
        )


# ---- ThinPool ------------------------------------------------------------------------------------


#: the period of the agents that published no refreshSeconds (csi_thin.node.agent.REFRESH_SECONDS then)
LEGACY_REFRESH_SECONDS = 30.0


def pool_object_name(node: str, pool: str) -> str:
    """One ThinPool per node and pool."""
    return f"{node}.{pool}"


@dataclasses.dataclass(frozen=True)
class PoolSpec:
    node_name: str
    pool: str

    def to_dict(self) -> dict[str, Any]:
        return {"nodeName": self.node_name, "pool": self.pool}

    @classmethod
    def from_dict(cls, raw: Any) -> PoolSpec:
        s = _obj(raw, "spec")
        return cls(node_name=_str(s, "nodeName", "spec"), pool=_str(s, "pool", "spec"))


@dataclasses.dataclass(frozen=True)
class PoolStatus:
    healthy: bool = False
    mode: str = ""
    block_size_bytes: int = 0
    data_used_bytes: int = 0
    data_total_bytes: int = 0
    metadata_used_bytes: int = 0
    metadata_total_bytes: int = 0
    provisioned_bytes: int = 0
    overprovision_ratio: float = 0.0
    data_threshold: float = 0.0
    metadata_threshold: float = 0.0
    volumes: int = 0
    snapshots: int = 0
    lost: tuple[str, ...] = ()
    orphans: tuple[str, ...] = ()  # record names without a CR, and "id:N" for ids without a record
    pool_transaction_id: int = 0
    store_transaction_id: int = 0
    last_updated: str = ""  # RFC 3339, whole seconds (csi_thin.kube.client.now), the node's clock
    #: the agent's promise: it rewrites this status at least this often (seconds). 0: not said (an
    #: agent from before the field, which published every 30 s; see `period`)
    refresh_seconds: float = 0.0
    #: host:port where the node serves CSI SnapshotMetadata to the controller (mutual TLS,
    #: csi_thin.csi.snapshot_metadata_link); empty: this node does not serve it
    snapshot_metadata_endpoint: str = ""

    @property
    def period(self) -> float:
        """How often the node promised to report (the old agents' fixed 30 s when it did not say)."""
        return self.refresh_seconds or LEGACY_REFRESH_SECONDS

    def updated_at(self) -> float | None:
        """lastUpdated as unix seconds; None when the node never wrote it."""
        if not self.last_updated:
            return None
        try:
            return float(calendar.timegm(time.strptime(self.last_updated, "%Y-%m-%dT%H:%M:%SZ")))
        except ValueError as exc:
            raise errors.Internal(f"status.lastUpdated: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        return {
            "health": "Healthy" if self.healthy else "Unhealthy",
            "mode": self.mode,
            "blockSizeBytes": self.block_size_bytes,
            "dataUsedBytes": self.data_used_bytes,
            "dataTotalBytes": self.data_total_bytes,
            "metadataUsedBytes": self.metadata_used_bytes,
            "metadataTotalBytes": self.metadata_total_bytes,
            "provisionedBytes": self.provisioned_bytes,
            "overprovisionRatio": str(self.overprovision_ratio),
            "thresholds": {"data": str(self.data_threshold), "metadata": str(self.metadata_threshold)},
            "volumes": self.volumes,
            "snapshots": self.snapshots,
            "lost": list(self.lost),
            "orphans": list(self.orphans),
            "poolTransactionId": self.pool_transaction_id,
            "storeTransactionId": self.store_transaction_id,
            "lastUpdated": self.last_updated,
            "refreshSeconds": self.refresh_seconds,
            "snapshotMetadataEndpoint": self.snapshot_metadata_endpoint,
        }

    @classmethod
    def from_dict(cls, raw: Any) -> PoolStatus:
        s = _obj(raw, "status")
        th = _obj(s.get("thresholds"), "status.thresholds")
        return cls(
            healthy=s.get("health") == "Healthy",
            mode=_str(s, "mode", "status"),
            block_size_bytes=_int(s, "blockSizeBytes", "status"),
            data_used_bytes=_int(s, "dataUsedBytes", "status"),
            data_total_bytes=_int(s, "dataTotalBytes", "status"),
            metadata_used_bytes=_int(s, "metadataUsedBytes", "status"),
            metadata_total_bytes=_int(s, "metadataTotalBytes", "status"),
            provisioned_bytes=_int(s, "provisionedBytes", "status"),
            overprovision_ratio=float(_str(s, "overprovisionRatio", "status") or 0.0),
            data_threshold=float(_str(th, "data", "status.thresholds") or 0.0),
            metadata_threshold=float(_str(th, "metadata", "status.thresholds") or 0.0),
            volumes=_int(s, "volumes", "status"),
            snapshots=_int(s, "snapshots", "status"),
            lost=tuple(str(x) for x in s.get("lost") or ()),
            orphans=tuple(str(x) for x in s.get("orphans") or ()),
            pool_transaction_id=_int(s, "poolTransactionId", "status"),
            store_transaction_id=_int(s, "storeTransactionId", "status"),
            last_updated=_str(s, "lastUpdated", "status"),
            refresh_seconds=_float(s, "refreshSeconds", "status"),
            snapshot_metadata_endpoint=_str(s, "snapshotMetadataEndpoint", "status"),
        )


@dataclasses.dataclass(frozen=True)
class ThinPool:
    meta: Meta
    spec: PoolSpec
    status: PoolStatus = dataclasses.field(default_factory=PoolStatus)

    kind = Kind.POOL

    @property
    def name(self) -> str:
        return self.meta.name

    def body(self) -> dict[str, Any]:
        return {
            "apiVersion": API_VERSION,
            "kind": Kind.POOL.value,
            "metadata": {"name": self.meta.name},
            "spec": self.spec.to_dict(),
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ThinPool:
        return cls(
            meta=Meta.from_dict(raw.get("metadata")),
            spec=PoolSpec.from_dict(raw.get("spec")),
            status=PoolStatus.from_dict(raw.get("status")),
        )


Resource = ThinVolume | ThinSnapshot | ThinGroupSnapshot | ThinPool


def decode(kind: Kind, raw: Mapping[str, Any]) -> Resource:
    if kind == Kind.VOLUME:
        return ThinVolume.from_dict(raw)
    if kind == Kind.SNAPSHOT:
        return ThinSnapshot.from_dict(raw)
    if kind == Kind.GROUP:
        return ThinGroupSnapshot.from_dict(raw)
    return ThinPool.from_dict(raw)
