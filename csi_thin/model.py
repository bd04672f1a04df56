"""Frozen values shared by the layers: device records, pool status, thresholds.

These are what the pool engine returns and what the controller and node services translate into CSI
messages. They carry no behaviour beyond derived properties and compatibility checks.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Mapping

#: dm-thin device ids are 24 bits wide.
MAX_DEVICE_ID = (1 << 24) - 1
SECTOR = 512
KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

#: the device attributes the CSI layer keeps on each volume (and hands back as volume_context)
ATTR_ACCESS_TYPE = "csi-thin.io/access-type"
ATTR_FS_TYPE = "csi-thin.io/fs-type"
#: set on a LAYER device when its containerd snapshot is committed (read-only for good: it takes
#: no thin headroom, csi_thin.controller.provisioner); never inherited by its children
ATTR_LAYER_COMMITTED = "csi-thin.io/layer-committed"


def committed_layer(attrs: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    """A LAYER device's attributes once its snapshot is committed."""
    return tuple(sorted({**dict(attrs), ATTR_LAYER_COMMITTED: "true"}.items()))


class DeviceKind(enum.StrEnum):
    VOLUME = "volume"
    SNAPSHOT = "snapshot"
    #: a containerd snapshot (csi_thin.snapshotter): its containerd side is a Layer record
    LAYER = "layer"


class DeviceState(enum.StrEnum):
    """Lifecycle of a device record. "-ing" states are intents; recovery resolves them."""

    CREATING = "creating"
    READY = "ready"
    DELETING = "deleting"
    LOST = "lost"  # the record exists but the pool has no such device: reported, never re-created


class PoolMode(enum.StrEnum):
    RW = "rw"
    RO = "ro"
    OUT_OF_DATA_SPACE = "out_of_data_space"
    FAIL = "fail"


@dataclasses.dataclass(frozen=True)
class Device:
    """One thin device (volume or snapshot) as recorded by the pool engine."""

    name: str
    dev_id: int
    kind: DeviceKind
    state: DeviceState
    size_bytes: int
    origin: str | None  # name of the device this one was snapshotted/cloned from
    created_at: float  # unix seconds
    active: bool = False  # a dm device (or loop device) exists for it right now
    path: str | None = None  # block device path while active
    #: opaque (key, value) pairs the creator attached (the CSI layer: access and filesystem type),
    #: sorted; part of what a repeated create must match
    attributes: tuple[tuple[str, str], ...] = ()
    #: the node whose pool holds it, where volumes may live on several nodes (Kubernetes mode); None
    #: in a node's own engine. Not stored in LMDB (a node's store only holds its own devices).
    node: str | None = None
    #: the volume group snapshot this snapshot was taken in, at one instant with the other members
    #: (csi_thin.pool.engine.create_group_snapshot); None for a snapshot of its own and for volumes
    group: str | None = None

    def is_compatible_with(
        self,
        *,
        kind: DeviceKind,
        size_bytes: int,
        origin: str | None,
        attributes: tuple[tuple[str, str], ...] = (),
    ) -> bool:
        """True when a create with these parameters may return this existing device (idempotency)."""
        return (
            self.kind == kind
            and self.size_bytes == size_bytes
            and self.origin == origin
            and self.attributes == attributes
        )


@dataclasses.dataclass(frozen=True)
class Tally:
    """How many device records of one kind and state, their bytes, and how many are active."""

    count: int = 0
    size_bytes: int = 0
    active: int = 0

    def __add__(self, other: Tally) -> Tally:
        return Tally(self.count + other.count, self.size_bytes + other.size_bytes, self.active + other.active)


@dataclasses.dataclass(frozen=True)
class Totals:
    """Running totals of a pool's device records by (kind, state), kept by the store in the same write
    transaction as each record change, so reading them costs the same whatever the pool holds."""

    tallies: tuple[tuple[DeviceKind, DeviceState, Tally], ...] = ()

    def of(self, *, kind: DeviceKind | None = None, state: DeviceState | None = None) -> Tally:
        """The sum over the records of this kind and state (None: any)."""
        out = Tally()
        for k, s, t in self.tallies:
            if kind in (None, k) and state in (None, s):
                out = out + t
        return out

    @property
    def provisioned_bytes(self) -> int:
        """Sum of the sizes of the READY volumes and snapshots."""
        return self.of(state=DeviceState.READY).size_bytes


def attributes(mapping: Mapping[str, str] | None) -> tuple[tuple[str, str], ...]:
    """The canonical (sorted) form of a device's attributes."""
    return tuple(sorted((mapping or {}).items()))


class LayerKind(enum.StrEnum):
    """containerd's snapshot kinds (the Kind enum of containerd.services.snapshots.v1)."""

    VIEW = "view"
    ACTIVE = "active"
    COMMITTED = "committed"


class LayerPending(enum.StrEnum):
    """A layer record written by a transaction still in flight (csi_thin.pool.layers): invisible to
    every reader until the transaction commits; recovery finishes or undoes it."""

    NONE = ""
    PREPARE = "prepare"  # the record a Prepare/View creates
    COMMIT = "commit"  # the committed record a Commit creates (its active record is dropped then)
    REMOVE = "remove"  # the record a Remove drops


@dataclasses.dataclass(frozen=True)
class Layer:
    """One containerd snapshot, keyed by containerd's key (or committed name): which thin device
    (a LAYER Device record) holds it. Kept in its own key space beside the device records."""

    key: str
    device: str  # the Device record's name
    kind: LayerKind
    parent: str  # "" for none: containerd's committed parent name
    labels: tuple[tuple[str, str], ...]
    created_at: float
    updated_at: float
    pending: LayerPending = LayerPending.NONE


@dataclasses.dataclass(frozen=True)
class PoolStatus:
    transaction_id: int
    block_size_bytes: int
    data_used_bytes: int
    data_total_bytes: int
    metadata_used_bytes: int
    metadata_total_bytes: int
    mode: PoolMode
    needs_check: bool

    @property
    def data_used_ratio(self) -> float:
        return self.data_used_bytes / self.data_total_bytes if self.data_total_bytes else 1.0

    @property
    def metadata_used_ratio(self) -> float:
        return self.metadata_used_bytes / self.metadata_total_bytes if self.metadata_total_bytes else 1.0

    @property
    def healthy(self) -> bool:
        return self.mode == PoolMode.RW and not self.needs_check


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """Above these used ratios, new devices are refused (existing ones keep working).

    Metadata's is lower: a full metadata device turns the pool read-only until an offline repair.
    """

    data: float = 0.95
    metadata: float = 0.80


@dataclasses.dataclass(frozen=True)
class TrimStats:
    """What the node's trims of a pool's staged filesystems gave back, over all runs (scheduled and
    `csi-thin pool trim`); kept in the pool's state dir, so it survives restarts.

    `trimmed_bytes` is what the filesystems said they discarded (fstrim's count: the first trim of a
    filesystem counts all its free space, blocks never written included); `reclaimed_bytes` is how
    far the pool's used data space fell across each run: the space really given back.
    """

    runs: int = 0
    failed_runs: int = 0
    trimmed_bytes: int = 0
    reclaimed_bytes: int = 0
    last_started_at: float | None = None
    last_finished_at: float | None = None
    last_filesystems: int = 0
    last_reclaimed_bytes: int = 0
    last_error: str = ""  # "" when the last run trimmed every filesystem
    next_at: float | None = None  # when the scheduler runs next (None: not scheduled)


@dataclasses.dataclass(frozen=True)
class Extent:
    """A byte range of a device: [offset, offset + length), length > 0."""

    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclasses.dataclass(frozen=True)
class BlockMap:
    """Changed-block tracking's answer about one snapshot: the ranges that hold data (allocated) or
    may differ from an older snapshot of the same volume (delta), ascending and disjoint, and the
    snapshot's size. A delta may name ranges whose bytes turn out equal (a superset), never fewer:
    copying exactly these ranges of the target onto a copy of the base rebuilds the target."""

    capacity_bytes: int
    extents: tuple[Extent, ...]


def merge_extents(ranges: Iterable[tuple[int, int]], *, limit: int) -> tuple[Extent, ...]:
    """(offset, length) pairs, ascending by offset, as disjoint Extents: touching or overlapping
    ranges joined, everything clipped to [0, limit), empty ranges dropped."""
    out: list[Extent] = []
    for offset, length in ranges:
        start, end = max(0, offset), min(limit, offset + length)
        if end <= start:
            continue
        if out and start < out[-1].offset:
            raise ValueError(f"ranges not ascending: {start} after {out[-1].offset}")
        if out and start <= out[-1].end:
            if end > out[-1].end:
                out[-1] = Extent(out[-1].offset, end - out[-1].offset)
            continue
        out.append(Extent(start, end - start))
    return tuple(out)
