"""The controller's engine in Kubernetes mode: volumes and snapshots as CustomResources.

It implements the Protocol of `csi_thin.controller.provisioner.Engine` (structurally: this package
imports nothing of the controller), so the provisioning logic (sizes, idempotency, overprovisioning,
capacity, pagination) is the same code as in standalone mode. Where standalone calls the pool, this
writes a spec and waits, by watch, for the node agent's status:

- a create makes the CR (an existing one with the same name is the same request: its spec must match,
  else ALREADY_EXISTS) and waits for Ready or Failed within the deadline. Failed carries the gRPC code
  the node met (RESOURCE_EXHAUSTED stays that, so the external-provisioner reschedules); the failed CR
  is deleted so that the retry starts afresh, on whatever node it then names. A deadline hit is
  DEADLINE_EXCEEDED and the retry finds the same CR and waits again.
- a delete deletes the CR and waits until it is gone (the node deletes the device, then drops its
  finalizer); absent is done.
- a grow raises spec.sizeBytes and waits until the node reports that generation.
- a group snapshot (create_group_snapshot) is first a ThinSnapshot per member (spec.group names
  the group), then ONE ThinGroupSnapshot naming them all: the node agent cuts every member in one
  engine mutation, so a crash anywhere leaves either no member device or all of them (the engine's
  journal), and every member CR exists before any device does (no device without a CR, nothing for
  gc to find). Its members are on one node, else FAILED_PRECONDITION before anything is written.
  Its delete deletes the group object first (the node deletes every member device in one mutation),
  then the members' objects.
- status() is the ThinPool status of the node (a node without a ThinPool has no capacity). A status
  the node has not refreshed within `stale_after` of it (its agent is down) is `errors.NodeSilent`:
  GetCapacity 0, creates on that node refused at once (RESOURCE_EXHAUSTED, before any CR is made),
  its volumes' health PoolUnavailable. A CR that an earlier attempt of the refused create left
  there, and the agent never took up, is withdrawn (see _withdraw). Deletes are untouched: the CR
  goes, its finalizer waits for the node as ever.

`CrEngine(api)` sees every node (get, list, delete, grow, snapshot and clone by name: each CR says
its node); `on(node)` is the view of one node (create_volume, status and list of that node).

Every wait for the node is told to `on_wait(operation, outcome, seconds)` (the controller's
csi_thin.metrics.Metrics.cr_wait: operations and outcomes are the fixed sets named there).
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

from csi_thin import deadline as deadline_mod
from csi_thin import errors, model
from csi_thin.kube import client as client_mod
from csi_thin.kube import resources as res
from csi_thin.kube import watch

log = logging.getLogger(__name__)

W = TypeVar("W", res.ThinVolume, res.ThinSnapshot, res.ThinGroupSnapshot)
#: (operation, outcome, seconds) of one wait for the node agent
WaitObserver = Callable[[str, str, float], None]


#: a node is silent once its status is older than this many of its own refresh periods ...
MISSED_PERIODS = 3
#: ... plus this margin. Three periods, not one: the agent's writer can be late by a publish that
#: failed and was retried with backoff, or by a slow API server, and a healthy node must not lose its
#: capacity (and so the scheduler's trust) to one hiccup; a node silent for three periods has missed
#: three chances in a row, which a live agent does not. The margin is for what the period does not
#: cover: lastUpdated is the node's clock read by the controller's clock (NTP keeps nodes within far
#: less than this; a node whose clock runs this far behind looks silent, which its operator should
#: hear about anyway), and lastUpdated has whole seconds (up to 1 s older than it is).
SKEW_SECONDS = 10.0


def stale_after(status: res.PoolStatus, *, skew_seconds: float = SKEW_SECONDS) -> float:
    """How old (seconds) a node's ThinPool status may be before the node counts as silent."""
    return MISSED_PERIODS * status.period + skew_seconds


def silence(status: res.PoolStatus, *, now: float, skew_seconds: float = SKEW_SECONDS) -> float | None:
    """The age of a status past its bound (seconds, at `now`, unix), or None while the node is fresh.
    A status never written is not silence: such a pool has no capacity anyway (see CrEngine.status)."""
    updated = status.updated_at()
    if updated is None:
        return None
    age = now - updated
    return age if age > stale_after(status, skew_seconds=skew_seconds) else None


def no_observer(operation: str, outcome: str, seconds: float) -> None:
    pass


_ERRORS: dict[str, type[errors.CsiThinError]] = {
    cls.code: cls
    for cls in (
        errors.InvalidArgument,
        errors.NotFound,
        errors.AlreadyExists,
        errors.OperationPending,
        errors.ResourceExhausted,
        errors.FailedPrecondition,
        errors.OutOfRange,
        errors.Unavailable,
        errors.DeadlineExceeded,
        errors.Unimplemented,
        errors.Internal,
    )
}

_STATES = {
    res.Phase.PENDING: model.DeviceState.CREATING,
    res.Phase.FAILED: model.DeviceState.CREATING,  # a create that the next call settles (see _settle)
    res.Phase.READY: model.DeviceState.READY,
    res.Phase.LOST: model.DeviceState.LOST,
    res.Phase.DELETING: model.DeviceState.DELETING,
}


def error_from_status(code: str, message: str) -> errors.CsiThinError:
    """The domain error a node reported by its gRPC code name (unknown codes: INTERNAL)."""
    return _ERRORS.get(code, errors.Internal)(message or code)


def _attributes(spec: res.VolumeSpec) -> tuple[tuple[str, str], ...]:
    attrs = {model.ATTR_ACCESS_TYPE: spec.access_type.value}
    if spec.fs_type:
        attrs[model.ATTR_FS_TYPE] = spec.fs_type
    return model.attributes(attrs)


def volume_device(tv: res.ThinVolume) -> model.Device:
    state = model.DeviceState.DELETING if tv.meta.deleting else _STATES[tv.status.phase]
    return model.Device(
        name=tv.name,
        dev_id=tv.status.device_id,
        kind=model.DeviceKind.VOLUME,
        state=state,
        size_bytes=tv.spec.size_bytes,
        origin=tv.spec.source.name if tv.spec.source else None,
        created_at=tv.status.created_at or time.time(),
        attributes=_attributes(tv.spec),
        node=tv.spec.node_name,
    )


def snapshot_device(ts: res.ThinSnapshot) -> model.Device:
    state = model.DeviceState.DELETING if ts.meta.deleting else _STATES[ts.status.phase]
    return model.Device(
        name=ts.name,
        dev_id=ts.status.device_id,
        kind=model.DeviceKind.SNAPSHOT,
        state=state,
        size_bytes=ts.status.size_bytes,
        origin=ts.spec.source_volume,
        created_at=ts.status.creation_time or time.time(),
        node=ts.spec.node_name,
        group=ts.spec.group or None,
    )


def _spec_from(
    *, node: str, pool: str, size_bytes: int, attributes: Mapping[str, str] | None, source: res.Source | None
) -> res.VolumeSpec:
    attrs = dict(attributes or {})
    access = res.AccessType(attrs.get(model.ATTR_ACCESS_TYPE, res.AccessType.MOUNT.value))
    return res.VolumeSpec(
        node_name=node,
        pool=pool,
        size_bytes=size_bytes,
        access_type=access,
        fs_type="" if access == res.AccessType.BLOCK else attrs.get(model.ATTR_FS_TYPE, ""),
        source=source,
    )


Watched = res.ThinVolume | res.ThinSnapshot | res.ThinGroupSnapshot


def _gone(obj: Watched | None) -> bool:
    return obj is None


def _ok(obj: Watched | None) -> str:
    return "ok"


def _settled_verdict(obj: Watched | None) -> str:
    if obj is None or obj.meta.deleting:
        return "deleted"
    if obj.status.phase == res.Phase.FAILED:
        return "failed"
    if obj.status.phase == res.Phase.LOST:
        return "lost"
    return "ok"


@dataclasses.dataclass(frozen=True)
class MetadataRoute:
    """A snapshot's node and the address where that node serves its blocks' metadata."""

    snapshot: str
    node: str
    source_volume: str
    endpoint: str  # host:port


class CrEngine:
    def __init__(
        self,
        api: client_mod.Client,
        *,
        node: str | None = None,
        on_wait: WaitObserver = no_observer,
        skew_seconds: float = SKEW_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._api = api
        self._node = node
        self._on_wait = on_wait
        self._skew = skew_seconds
        #: wall clock (unix seconds): it is compared with the nodes' lastUpdated
        self._clock = clock

    def on(self, node: str) -> CrEngine:
        return CrEngine(
            self._api, node=node, on_wait=self._on_wait, skew_seconds=self._skew, clock=self._clock
        )

    def _wait(
        self,
        operation: str,
        cls: type[W],
        name: str,
        done: Callable[[W | None], bool],
        verdict: Callable[[W | None], str],
        *,
        deadline: deadline_mod.Deadline,
        what: str,
    ) -> W | None:
        """watch.wait_for, timed and told to on_wait with its outcome (`verdict` of what it returned:
        ok, failed, lost or deleted; else timeout or error)."""
        started = time.monotonic()
        outcome = "error"
        try:
            got = watch.wait_for(self._api, cls, name, done, deadline=deadline, what=what)
            outcome = verdict(got)
        except errors.DeadlineExceeded:
            outcome = "timeout"
            raise
        finally:
            self._on_wait(operation, outcome, time.monotonic() - started)
        return got

    # ---- creates -------------------------------------------------------------------------------

    def create_volume(
        self,
        name: str,
        size_bytes: int,
        *,
        deadline: deadline_mod.Deadline,
        attributes: Mapping[str, str] | None = None,
    ) -> model.Device:
        node = self._bound("create_volume")
        try:
            pool = self._fresh_pool(node, deadline=deadline).spec.pool
        except errors.NodeSilent as exc:
            self._withdraw(name, exc, deadline=deadline)
            raise
        spec = _spec_from(node=node, pool=pool, size_bytes=size_bytes, attributes=attributes, source=None)
        return self._create_volume(name, spec, deadline=deadline)

    def clone(
        self,
        name: str,
        source: str,
        size_bytes: int,
        *,
        deadline: deadline_mod.Deadline,
        attributes: Mapping[str, str] | None = None,
    ) -> model.Device:
        """A volume from a snapshot (restore) or a volume (clone), on the source's node."""
        if source.startswith("s"):
            src_obj: res.ThinVolume | res.ThinSnapshot = self._api.get(
                res.ThinSnapshot, source, deadline=deadline
            )
            ref = res.Source(snapshot=source)
        else:
            src_obj = self._api.get(res.ThinVolume, source, deadline=deadline)
            ref = res.Source(volume=source)
        try:
            self._fresh_pool(src_obj.spec.node_name, deadline=deadline)
        except errors.NodeSilent as exc:
            self._withdraw(name, exc, deadline=deadline)
            raise
        spec = _spec_from(
            node=src_obj.spec.node_name,
            pool=src_obj.spec.pool,
            size_bytes=size_bytes,
            attributes=attributes,
            source=ref,
        )
        return self._create_volume(name, spec, deadline=deadline)

    def create_snapshot(self, name: str, source: str, *, deadline: deadline_mod.Deadline) -> model.Device:
        vol = self._api.get(res.ThinVolume, source, deadline=deadline)
        spec = res.SnapshotSpec(node_name=vol.spec.node_name, pool=vol.spec.pool, source_volume=source)
        want = res.ThinSnapshot(meta=res.Meta(name=name), spec=spec)
        try:
            obj = self._api.create(want, deadline=deadline)
        except errors.AlreadyExists:
            obj = self._api.get(res.ThinSnapshot, name, deadline=deadline)
            if obj.spec.source_volume != source:
                raise errors.AlreadyExists(f"snapshot {name!r} exists with another source volume") from None
        done = self._settle("create_snapshot", res.ThinSnapshot, obj, deadline=deadline)
        return snapshot_device(done)

    def _create_volume(
        self, name: str, spec: res.VolumeSpec, *, deadline: deadline_mod.Deadline
    ) -> model.Device:
        want = res.ThinVolume(meta=res.Meta(name=name), spec=spec)
        try:
            obj = self._api.create(want, deadline=deadline)
        except errors.AlreadyExists:
            obj = self._api.get(res.ThinVolume, name, deadline=deadline)
            if obj.spec != spec:
                raise errors.AlreadyExists(
                    f"volume {name!r} exists as {obj.spec}, incompatible with {spec}"
                ) from None
        return volume_device(self._settle("create_volume", res.ThinVolume, obj, deadline=deadline))

    def _withdraw(self, name: str, silent: errors.NodeSilent, *, deadline: deadline_mod.Deadline) -> None:
        """A create refused because its node is silent may be the retry of one whose CR is there
        already (made just before the node went silent). Unless its agent has taken it up (the
        finalizer, added before any device is made), delete exactly that version of it: the retry,
        which the external-provisioner may now send to another node, then starts afresh there,
        instead of finding this CR and being sent back to the silent node every time.

        A CR the agent has taken up and not settled, or one it touches meanwhile (Conflict), stays
        for the node to finish, and the refusal is then not RESOURCE_EXHAUSTED but ABORTED: with a
        selected node, RESOURCE_EXHAUSTED makes the external-provisioner reschedule the claim and stop
        calling CreateVolume (it means nothing goes on in the background); if the claim were deleted
        then, no one would delete this CR, and the device its agent makes or made would be leaked."""
        obj = self._api.find(res.ThinVolume, name, deadline=deadline)
        if obj is None or obj.meta.deleting:
            return
        if obj.meta.finalizers:
            if _settled_verdict(obj) != "ok" or (
                obj.status.phase == res.Phase.READY and obj.status.observed_generation >= obj.meta.generation
            ):
                return  # settled: nothing goes on in the background
            raise errors.OperationPending(
                f"{name!r} was taken up by its node, which has stopped reporting: the create goes on "
                f"when it is back ({silent.message})"
            )
        try:
            self._api.delete(
                res.ThinVolume,
                name,
                deadline=deadline,
                uid=obj.meta.uid,
                resource_version=obj.meta.resource_version,
            )
        except client_mod.Conflict:
            raise errors.OperationPending(
                f"{name!r} changed while being withdrawn from its silent node (its agent may have "
                f"taken it up): retry ({silent.message})"
            ) from None
        log.info("event=create-withdrawn name=%s node=%s reason=node-silent", name, obj.spec.node_name)

    def _settle(self, operation: str, cls: type[W], obj: W, *, deadline: deadline_mod.Deadline) -> W:
        """Wait for the node's verdict on this generation: Ready is the device; Failed is the node's
        error (and the CR goes, so a retry starts afresh); deleted meanwhile is ABORTED."""
        if obj.meta.deleting:
            raise errors.OperationPending(f"{obj.name!r} is being deleted; retry later")
        got = self._wait(
            operation,
            cls,
            obj.name,
            lambda o: o is None or o.meta.deleting or o.settled,
            _settled_verdict,
            deadline=deadline,
            what=f"waiting for node {obj.spec.node_name}",
        )
        if got is None or got.meta.deleting:
            raise errors.OperationPending(f"{obj.name!r} was deleted while it was being created; retry")
        if got.status.phase == res.Phase.FAILED:
            # this object only: a concurrent call for the name may already have deleted it and made
            # a new one (perhaps Ready and handed out by now)
            with contextlib.suppress(client_mod.Conflict):
                self._api.delete(cls, got.name, deadline=deadline, uid=got.meta.uid)
            raise error_from_status(got.status.code, f"node {got.spec.node_name}: {got.status.message}")
        if got.status.phase == res.Phase.LOST:
            raise errors.FailedPrecondition(
                f"{got.name!r} is LOST on node {got.spec.node_name}: {got.status.message}"
            )
        return got

    # ---- group snapshots -------------------------------------------------------------------------

    def create_group_snapshot(
        self, group: str, members: Sequence[tuple[str, str]], *, deadline: deadline_mod.Deadline
    ) -> builtins.list[model.Device]:
        """Every (snapshot name, source volume) cut at one instant, on the sources' node; the member
        snapshots in the order given. A retry finds what its first attempt wrote and waits again."""
        if len(members) > res.MAX_GROUP_MEMBERS:
            # before any member is written: the group object would be refused after them, and
            # nothing would ever name (and delete) those members
            raise errors.InvalidArgument(
                f"group snapshot {group!r}: {len(members)} volumes; a group holds at most "
                f"{res.MAX_GROUP_MEMBERS}"
            )
        vols = [self._api.get(res.ThinVolume, source, deadline=deadline) for _, source in members]
        nodes = sorted({v.spec.node_name for v in vols})
        if len(nodes) != 1:
            where = ", ".join(f"{v.name} on {v.spec.node_name}" for v in vols)
            raise errors.FailedPrecondition(
                f"group snapshot {group!r}: its volumes live on different nodes ({where}); a group "
                "snapshot is cut on one node's pool, so all of its volumes must be on one node"
            )
        spec = res.GroupSpec(
            node_name=nodes[0],
            pool=vols[0].spec.pool,
            members=tuple(res.Member(snapshot=n, source_volume=s) for n, s in members),
        )
        existing = self._api.find(res.ThinGroupSnapshot, group, deadline=deadline)
        if existing is not None and not _same_members(existing.spec, spec):
            raise errors.AlreadyExists(
                f"group snapshot {group!r} exists with other volumes ({_sources(existing.spec)}), "
                f"not {_sources(spec)}"
            )
        if existing is None:
            # the members first: once the group object exists the node may cut them, and every device
            # it makes must already have its object (no device without a CR after any crash)
            for m in spec.members:
                self._member(group, m, spec, deadline=deadline)
            try:
                existing = self._api.create(
                    res.ThinGroupSnapshot(meta=res.Meta(name=group), spec=spec), deadline=deadline
                )
            except errors.AlreadyExists:
                existing = self._api.get(res.ThinGroupSnapshot, group, deadline=deadline)
                if not _same_members(existing.spec, spec):
                    raise errors.AlreadyExists(
                        f"group snapshot {group!r} exists with other volumes ({_sources(existing.spec)})"
                    ) from None
        try:
            self._settle("create_group_snapshot", res.ThinGroupSnapshot, existing, deadline=deadline)
        except errors.CsiThinError as exc:
            if not isinstance(exc, errors.OperationPending | errors.DeadlineExceeded) and self._withdrawn(
                group, deadline=deadline
            ):
                # the group failed as a whole (nothing was cut) and its object went: its members go
                # too, so that a retry starts afresh. Not after an error of the wait itself (the API
                # server's): the group lives on, and its node waits for every member to cut it
                self._drop_members(group, spec.members, deadline=deadline)
            raise
        return self._members(group, spec.members, deadline=deadline)

    def delete_group_snapshot(self, group: str, *, deadline: deadline_mod.Deadline) -> None:
        """The group object first (its node deletes every member device in one mutation), then the
        members' objects; absent is done. A retry after a crash in between finds the members by
        their spec.group."""
        obj = self._api.find(res.ThinGroupSnapshot, group, deadline=deadline)
        if obj is not None:
            members: Sequence[str] = [m.snapshot for m in obj.spec.members]
            self._api.delete(res.ThinGroupSnapshot, group, deadline=deadline)
            self._wait(
                "delete",
                res.ThinGroupSnapshot,
                group,
                _gone,
                _ok,
                deadline=deadline,
                what="waiting for the node to delete the group's devices",
            )
        else:
            members = [s.name for s in self._orphaned_members(group, deadline=deadline)]
        for name in members:
            self.delete(name, deadline=deadline)

    def get_group(self, group: str) -> builtins.list[model.Device]:
        """The members of a group snapshot (as ordinary snapshots, in the group's order); [] when
        there is no such group (as the pool engine's get_group). Without its group object, the
        snapshots that name it (a delete cut short between the group and its members: what a
        repeated DeleteVolumeGroupSnapshot must still delete)."""
        dl = deadline_mod.Deadline.after(client_mod.READ_SECONDS)
        obj = self._api.find(res.ThinGroupSnapshot, group, deadline=dl)
        if obj is None:
            return [snapshot_device(s) for s in self._orphaned_members(group, deadline=dl)]
        out: builtins.list[model.Device] = []
        for m in obj.spec.members:
            ts = self._api.find(res.ThinSnapshot, m.snapshot, deadline=dl)
            if ts is not None:
                out.append(snapshot_device(ts))
        return out

    def _orphaned_members(
        self, group: str, *, deadline: deadline_mod.Deadline
    ) -> builtins.list[res.ThinSnapshot]:
        """The snapshots naming a group whose object is gone (a rare path: one list of every node's
        snapshots)."""
        snaps, _ = self._api.list(res.ThinSnapshot, deadline=deadline)
        return sorted((s for s in snaps if s.spec.group == group), key=lambda s: s.name)

    def _member(
        self, group: str, member: res.Member, spec: res.GroupSpec, *, deadline: deadline_mod.Deadline
    ) -> None:
        want = res.ThinSnapshot(
            meta=res.Meta(name=member.snapshot),
            spec=res.SnapshotSpec(
                node_name=spec.node_name, pool=spec.pool, source_volume=member.source_volume, group=group
            ),
        )
        try:
            self._api.create(want, deadline=deadline)
        except errors.AlreadyExists:
            got = self._api.get(res.ThinSnapshot, member.snapshot, deadline=deadline)
            if got.spec != want.spec:
                raise errors.AlreadyExists(
                    f"snapshot {member.snapshot!r} exists, of volume {got.spec.source_volume!r} in group "
                    f"{got.spec.group or '(none)'!r}: it cannot be a member of group {group!r}"
                ) from None
            if got.meta.deleting:
                raise errors.OperationPending(f"{member.snapshot!r} is being deleted; retry later") from None

    def _members(
        self, group: str, members: Sequence[res.Member], *, deadline: deadline_mod.Deadline
    ) -> builtins.list[model.Device]:
        """The member snapshots of a group the node reported Ready (it writes every member's status
        before the group's), each as it is now (a member Lost since is reported so)."""
        out = []
        for m in members:
            ts = self._api.find(res.ThinSnapshot, m.snapshot, deadline=deadline)
            if ts is None:
                raise errors.FailedPrecondition(
                    f"group snapshot {group!r}: its member {m.snapshot!r} is gone (removed by force?)"
                )
            out.append(snapshot_device(ts))
        return out

    def _withdrawn(self, group: str, *, deadline: deadline_mod.Deadline) -> bool:
        """The group object is gone or being deleted (as the API server has it now); False when
        that cannot be read."""
        try:
            obj = self._api.find(res.ThinGroupSnapshot, group, deadline=deadline)
        except errors.CsiThinError as exc:
            log.warning("event=group-unread name=%s error=%s action=members-kept", group, exc)
            return False
        return obj is None or obj.meta.deleting

    def _drop_members(
        self, group: str, members: Sequence[res.Member], *, deadline: deadline_mod.Deadline
    ) -> None:
        for m in members:
            ts = self._api.find(res.ThinSnapshot, m.snapshot, deadline=deadline)
            if ts is not None and ts.spec.group == group:
                with contextlib.suppress(client_mod.Conflict, errors.NotFound):
                    self._api.delete(res.ThinSnapshot, m.snapshot, deadline=deadline, uid=ts.meta.uid)

    # ---- delete, grow --------------------------------------------------------------------------

    def delete(self, name: str, *, deadline: deadline_mod.Deadline) -> None:
        """A volume's or snapshot's object, and wait until its node deleted the device. A group's
        member is refused where the CSI layer looks (its Device.group): only its group deletes it."""
        what = "waiting for the node to delete the device"
        if name.startswith("s"):
            self._api.delete(res.ThinSnapshot, name, deadline=deadline)
            self._wait("delete", res.ThinSnapshot, name, _gone, _ok, deadline=deadline, what=what)
        else:
            self._api.delete(res.ThinVolume, name, deadline=deadline)
            self._wait("delete", res.ThinVolume, name, _gone, _ok, deadline=deadline, what=what)

    def grow(self, name: str, size_bytes: int, *, deadline: deadline_mod.Deadline) -> model.Device:
        obj = self._api.get(res.ThinVolume, name, deadline=deadline)
        if obj.spec.size_bytes < size_bytes:
            try:
                obj = self._api.patch_spec(obj, {"sizeBytes": size_bytes}, deadline=deadline)
            except client_mod.Conflict as exc:
                raise errors.OperationPending(f"{name!r} changed meanwhile; retry") from exc
        got = self._wait(
            "expand",
            res.ThinVolume,
            name,
            lambda o: o is None or o.meta.deleting or o.status.observed_generation >= o.meta.generation,
            lambda o: (
                "deleted"
                if o is None or o.meta.deleting
                else "failed"
                if o.status.size_bytes < size_bytes
                else "ok"
            ),
            deadline=deadline,
            what=f"waiting for node {obj.spec.node_name} to grow the device",
        )
        if got is None or got.meta.deleting:
            raise errors.NotFound(f"volume {name!r} was deleted")
        if got.status.size_bytes < size_bytes:
            raise error_from_status(
                got.status.code or "INTERNAL", f"node {got.spec.node_name}: {got.status.message}"
            )
        return volume_device(got)

    # ---- reads ---------------------------------------------------------------------------------

    def metadata_route(
        self, name: str, *, deadline: deadline_mod.Deadline, what: str = "snapshot"
    ) -> MetadataRoute:
        """Where the snapshot `name`'s blocks are read: the node its ThinSnapshot names, at the
        SnapshotMetadata endpoint that node's own ThinPool publishes (csi_thin.csi.snapshot_metadata_link).

        NotFound without the CR; Unavailable when that node is silent or serves no endpoint. Only the
        CR names the node: the endpoint is taken from that node's and that pool's ThinPool alone.
        """
        ts = self._api.find(res.ThinSnapshot, name, deadline=deadline)
        if ts is None:
            raise errors.NotFound(f"{what} {name!r} not found")  # the node's words (pool.engine)
        node = ts.spec.node_name
        pools, _ = self._api.list(res.ThinPool, deadline=deadline, node=node)
        tp = next((p for p in pools if p.spec.pool == ts.spec.pool and p.spec.node_name == node), None)
        if tp is None:
            raise errors.Unavailable(
                f"snapshot {name!r} is on node {node!r}, which has no ThinPool {ts.spec.pool!r}: "
                "is its csi-thin node agent running?"
            )
        try:
            self._check_fresh(node, tp.status)
        except errors.NodeSilent as exc:  # nothing to place here: its blocks cannot be read now
            raise errors.Unavailable(exc.message) from exc
        if not tp.status.snapshot_metadata_endpoint:
            raise errors.Unavailable(
                f"snapshot {name!r} is on node {node!r}, whose node agent serves no snapshot metadata "
                "endpoint (started without --snapshot-metadata-listen)"
            )
        return MetadataRoute(
            snapshot=name,
            node=node,
            source_volume=ts.spec.source_volume,
            endpoint=tp.status.snapshot_metadata_endpoint,
        )

    def get(self, name: str) -> model.Device | None:
        dl = deadline_mod.Deadline.after(client_mod.READ_SECONDS)
        if name.startswith("s"):
            ts = self._api.find(res.ThinSnapshot, name, deadline=dl)
            return None if ts is None else snapshot_device(ts)
        tv = self._api.find(res.ThinVolume, name, deadline=dl)
        return None if tv is None else volume_device(tv)

    def list(self, *, kind: model.DeviceKind | None = None) -> builtins.list[model.Device]:
        dl = deadline_mod.Deadline.after(client_mod.READ_SECONDS)
        out: builtins.list[model.Device] = []
        if kind in (None, model.DeviceKind.VOLUME):
            vols, _ = self._api.list(res.ThinVolume, deadline=dl, node=self._node)
            out.extend(volume_device(v) for v in vols)
        if kind in (None, model.DeviceKind.SNAPSHOT):
            snaps, _ = self._api.list(res.ThinSnapshot, deadline=dl, node=self._node)
            out.extend(snapshot_device(s) for s in snaps)
        return sorted(out, key=lambda d: d.name)

    def page(self, kind: model.DeviceKind, *, after: str, limit: int) -> builtins.list[model.Device]:
        # the API server lists this node's CRs whole (its own cost); a page is cut from that
        devices = [d for d in self.list(kind=kind) if d.name > after]
        return devices[:limit] if limit else devices

    def volume_bytes(self) -> int:
        return sum(d.size_bytes for d in self.list(kind=model.DeviceKind.VOLUME))

    def status(self, *, deadline: deadline_mod.Deadline) -> model.PoolStatus:
        """The pool status the node last reported; a node without a ThinPool is a failed pool (no
        capacity, nothing created there)."""
        node = self._bound("status")
        try:
            st = self._pool(node, deadline=deadline).status
        except errors.ResourceExhausted:
            return model.PoolStatus(0, 0, 0, 0, 0, 0, model.PoolMode.FAIL, needs_check=False)
        self._check_fresh(node, st)
        try:
            mode = model.PoolMode(st.mode)
        except ValueError:
            mode = model.PoolMode.FAIL
        return model.PoolStatus(
            transaction_id=st.pool_transaction_id,
            block_size_bytes=st.block_size_bytes,
            data_used_bytes=st.data_used_bytes,
            data_total_bytes=st.data_total_bytes,
            metadata_used_bytes=st.metadata_used_bytes,
            metadata_total_bytes=st.metadata_total_bytes,
            mode=mode,
            needs_check=not st.healthy and mode == model.PoolMode.RW,
        )

    def space_thresholds(self, *, deadline: deadline_mod.Deadline) -> model.Thresholds:
        """The thresholds the node's pool is configured with, as its ThinPool status reports them
        (the defaults until the node has reported any)."""
        node = self._bound("space_thresholds")
        try:
            st = self._pool(node, deadline=deadline).status
        except errors.ResourceExhausted:
            return model.Thresholds()
        default = model.Thresholds()
        return model.Thresholds(
            data=st.data_threshold or default.data, metadata=st.metadata_threshold or default.metadata
        )

    # ---- helpers -------------------------------------------------------------------------------

    def _bound(self, what: str) -> str:
        if self._node is None:
            raise errors.Internal(f"{what} needs the engine of one node (CrEngine.on(node))")
        return self._node

    def _fresh_pool(self, node: str, *, deadline: deadline_mod.Deadline) -> res.ThinPool:
        """The node's ThinPool, if its agent is alive enough to have a device made there."""
        tp = self._pool(node, deadline=deadline)
        self._check_fresh(node, tp.status)
        return tp

    def _check_fresh(self, node: str, status: res.PoolStatus) -> None:
        age = silence(status, now=self._clock(), skew_seconds=self._skew)
        if age is not None:
            # what matters first: health messages are cut to CSI's 128 bytes (csi_thin.csi.health)
            raise errors.NodeSilent(
                f"node agent has not reported for {age:.0f} s on node {node!r} (bound "
                f"{stale_after(status, skew_seconds=self._skew):g} s: 3 x its {status.period:g} s period "
                f"+ {self._skew:g} s skew): no new volumes go there until it does"
            )

    def _pool(self, node: str, *, deadline: deadline_mod.Deadline) -> res.ThinPool:
        pools, _ = self._api.list(res.ThinPool, deadline=deadline, node=node)
        if not pools:
            raise errors.ResourceExhausted(
                f"node {node!r} has no ThinPool: is its csi-thin node agent running?"
            )
        return sorted(pools, key=lambda p: p.name)[0]


def _same_members(a: res.GroupSpec, b: res.GroupSpec) -> bool:
    return sorted(a.members, key=lambda m: m.snapshot) == sorted(b.members, key=lambda m: m.snapshot)


def _sources(spec: res.GroupSpec) -> str:
    return ", ".join(sorted(m.source_volume for m in spec.members))
