"""Pure pieces of Kubernetes mode: the typed CRs' dict edge (round trips, malformed input), API
errors into domain errors, node status codes back into domain errors, the agent's work queue, and
the provisioner's placement over many nodes (fake engines, one per node)."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from collections.abc import Mapping
from typing import Any

import kubernetes
import pytest
import yaml

from csi_thin import deadline as deadline_mod
from csi_thin import errors, metrics, model
from csi_thin.controller import provisioner
from csi_thin.kube import client as client_mod
from csi_thin.kube import crengine
from csi_thin.kube import resources as res
from csi_thin.node import agent
from tests.unit.fake_engine import FakeEngine

MiB = model.MiB


def dl() -> deadline_mod.Deadline:
    return deadline_mod.Deadline.after(60)


def _api_dict(obj: res.ThinVolume | res.ThinSnapshot | res.ThinGroupSnapshot) -> dict[str, Any]:
    body = obj.body()
    body["metadata"] = {
        "name": obj.name,
        "resourceVersion": "7",
        "generation": 2,
        "finalizers": [res.FINALIZER],
    }
    body["status"] = obj.status.to_dict()
    return body


def test_thin_volume_round_trip() -> None:
    tv = res.ThinVolume(
        meta=res.Meta(name="v-pvc-1", resource_version="7", generation=2, finalizers=(res.FINALIZER,)),
        spec=res.VolumeSpec(
            node_name="n1", pool="p", size_bytes=64 * MiB, fs_type="ext4", source=res.Source(snapshot="s-x")
        ),
        status=res.VolumeStatus(
            phase=res.Phase.READY,
            size_bytes=64 * MiB,
            device_id=3,
            observed_generation=2,
            created_at=1700000000.5,
            conditions=(res.Condition(type="Ready", status="True", reason="Ready", observed_generation=2),),
        ),
    )
    back = res.ThinVolume.from_dict(json.loads(json.dumps(_api_dict(tv))))
    assert back == tv
    assert back.settled and back.spec.source is not None and back.spec.source.name == "s-x"


@pytest.mark.parametrize(
    ("phase", "deleting", "outcome"),
    [
        (res.Phase.READY, False, "ok"),
        (res.Phase.FAILED, False, "failed"),
        (res.Phase.LOST, False, "lost"),
        (res.Phase.READY, True, "deleted"),
        (None, False, "deleted"),  # gone while the controller waited
    ],
)
def test_a_cr_wait_outcome_is_what_the_node_said(
    phase: res.Phase | None, deleting: bool, outcome: str
) -> None:
    """cr_wait_seconds' outcome label, from the object the wait returned (a closed set)."""
    tv = (
        None
        if phase is None
        else res.ThinVolume(
            meta=res.Meta(name="v-pvc-1", generation=1, deleting=deleting),
            spec=res.VolumeSpec(node_name="n1", pool="p", size_bytes=64 * MiB),
            status=res.VolumeStatus(phase=phase, observed_generation=1),
        )
    )
    assert crengine._settled_verdict(tv) == outcome
    assert outcome in metrics.CR_WAIT_OUTCOMES


def test_thin_snapshot_and_pool_round_trip() -> None:
    ts = res.ThinSnapshot(
        meta=res.Meta(name="s-1", resource_version="7", generation=2, finalizers=(res.FINALIZER,)),
        spec=res.SnapshotSpec(node_name="n1", pool="p", source_volume="v-1"),
        status=res.SnapshotStatus(phase=res.Phase.READY, ready_to_use=True, size_bytes=MiB, device_id=4),
    )
    assert res.ThinSnapshot.from_dict(_api_dict(ts)) == ts
    member = res.ThinSnapshot(
        meta=res.Meta(name="s-2", resource_version="7", generation=2, finalizers=(res.FINALIZER,)),
        spec=res.SnapshotSpec(node_name="n1", pool="p", source_volume="v-1", group="g-1"),
    )
    assert res.ThinSnapshot.from_dict(_api_dict(member)) == member
    assert "group" not in ts.spec.to_dict()  # a snapshot of its own says nothing of groups
    tg = res.ThinGroupSnapshot(
        meta=res.Meta(name="g-1", resource_version="7", generation=2, finalizers=(res.FINALIZER,)),
        spec=res.GroupSpec(
            node_name="n1",
            pool="p",
            members=(res.Member(snapshot="s-2", source_volume="v-1"), res.Member("s-3", "v-2")),
        ),
        status=res.GroupStatus(phase=res.Phase.READY, ready_to_use=True, creation_time=12.5),
    )
    assert res.ThinGroupSnapshot.from_dict(json.loads(json.dumps(_api_dict(tg)))) == tg
    assert res.decode(res.Kind.GROUP, _api_dict(tg)) == tg
    assert res.Kind.GROUP.plural == "thingroupsnapshots"
    st = res.PoolStatus(healthy=True, mode="rw", data_total_bytes=10, orphans=("v-x", "id:9"), lost=("v-y",))
    assert res.PoolStatus.from_dict(json.loads(json.dumps(st.to_dict()))) == st


@pytest.mark.parametrize(
    "raw",
    [
        {"metadata": {"name": "v-1"}, "spec": {"nodeName": 3, "pool": "p", "sizeBytes": 1}},
        {"metadata": {"name": "v-1"}, "spec": {"nodeName": "n", "pool": "p", "sizeBytes": "big"}},
        {"metadata": {"name": "v-1"}, "spec": {"nodeName": "n", "pool": "p", "sizeBytes": True}},
        {"metadata": {"name": "v-1"}, "spec": []},
        {"metadata": {"name": "v-1"}, "spec": {"nodeName": "n", "accessType": "tape"}},
        {"metadata": {"name": "v-1"}, "spec": {"nodeName": "n"}, "status": {"phase": "Fine"}},
    ],
)
def test_malformed_objects_are_internal_errors(raw: dict[str, Any]) -> None:
    with pytest.raises(errors.Internal):
        res.ThinVolume.from_dict(raw)


def _api_error(status: int, reason: str = "") -> Exception:
    exc = kubernetes.client.exceptions.ApiException(status=status, reason="r")
    exc.body = json.dumps({"message": "m", "reason": reason})
    return exc


@pytest.mark.parametrize(
    ("status", "reason", "cls"),
    [
        (404, "NotFound", errors.NotFound),
        (409, "AlreadyExists", errors.AlreadyExists),
        (409, "Conflict", client_mod.Conflict),
        (410, "Expired", client_mod.Gone),
        (403, "Forbidden", client_mod.Forbidden),
        (422, "Invalid", client_mod.Invalid),
        (500, "InternalError", errors.Unavailable),
        (503, "ServiceUnavailable", errors.Unavailable),
    ],
)
def test_api_errors_become_domain_errors(status: int, reason: str, cls: type[Exception]) -> None:
    def fail(timeout: tuple[float, float]) -> None:
        assert timeout[1] > 0
        raise _api_error(status, reason)

    with pytest.raises(cls) as info:
        client_mod.Client._call("get x", dl(), fail)
    assert type(info.value) is cls
    assert "get x: m" in str(info.value)


def test_a_spent_deadline_makes_no_call() -> None:
    with pytest.raises(errors.DeadlineExceeded):
        client_mod.Client._call("get x", deadline_mod.Deadline(0.0), lambda t: pytest.fail("called"))


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        ("RESOURCE_EXHAUSTED", errors.ResourceExhausted),
        ("FAILED_PRECONDITION", errors.FailedPrecondition),
        ("UNAVAILABLE", errors.Unavailable),
        ("OUT_OF_RANGE", errors.OutOfRange),
        ("INVALID_ARGUMENT", errors.InvalidArgument),
        ("SOMETHING_NEW", errors.Internal),
        ("", errors.Internal),
    ],
)
def test_node_codes_map_back(code: str, cls: type[errors.CsiThinError]) -> None:
    exc = crengine.error_from_status(code, "node says no")
    assert type(exc) is cls
    assert exc.message == "node says no"


def test_work_queue_dedupes_and_keeps_the_earliest_due() -> None:
    q = agent._Queue()
    a, b = (res.Kind.VOLUME, "v-a"), (res.Kind.SNAPSHOT, "s-b")
    q.put(a, delay=60)
    q.put(b)
    q.put(b)
    q.put(a)  # an immediate put supersedes the delayed one
    got = {q.get(), q.get()}
    assert got == {a, b}
    assert q.empty()
    q.put(a, delay=0.05)
    t0 = time.monotonic()
    assert q.get() == a
    assert time.monotonic() - t0 >= 0.04
    q.close()
    assert q.get() is None


# ---- placement over many nodes ------------------------------------------------------------------


class _Cluster:
    """Name-wide view over one FakeEngine per node (what the CR engine is in Kubernetes mode)."""

    def __init__(self, nodes: Mapping[str, FakeEngine]) -> None:
        self.nodes = dict(nodes)

    def _where(self, name: str) -> str | None:
        return next((n for n, e in self.nodes.items() if name in e.devices), None)

    def get(self, name: str) -> model.Device | None:
        node = self._where(name)
        return None if node is None else dataclasses.replace(self.nodes[node].devices[name], node=node)

    def list(self, *, kind: model.DeviceKind | None = None) -> list[model.Device]:
        return [dataclasses.replace(d, node=n) for n, e in self.nodes.items() for d in e.list(kind=kind)]

    def __getattr__(self, op: str) -> Any:  # create_snapshot, clone, delete, grow: on the name's node
        def call(name: str, *args: Any, **kwargs: Any) -> Any:
            node = self._where(args[0] if op in ("clone", "create_snapshot") else name)
            assert node is not None
            got = getattr(self.nodes[node], op)(name, *args, **kwargs)
            return None if got is None else dataclasses.replace(got, node=node)

        return call

    def on(self, node: str) -> Any:
        return _NodeView(self.nodes[node], node)


@dataclasses.dataclass
class _NodeView:
    engine: FakeEngine
    node: str

    def __getattr__(self, op: str) -> Any:
        attr = getattr(self.engine, op)
        if op in ("create_volume", "clone", "grow"):
            return lambda *a, **k: dataclasses.replace(attr(*a, **k), node=self.node)
        return attr


def _prov(**sizes: int) -> tuple[provisioner.Provisioner, _Cluster]:
    cluster = _Cluster({n: FakeEngine(data_total=s) for n, s in sizes.items()})
    settings = provisioner.Settings(node_id=None, block_size=64 * 1024)
    return provisioner.Provisioner(engine=cluster, settings=settings, nodes=cluster.on), cluster  # type: ignore[arg-type]


def _req(name: str, size: int, **kw: Any) -> provisioner.VolumeRequest:
    return provisioner.VolumeRequest(name=name, capacity=provisioner.CapacityRange(size), **kw)


def test_placement_prefers_in_order_among_the_allowed() -> None:
    prov, cluster = _prov(a=10 * model.GiB, b=10 * model.GiB, c=10 * model.GiB)
    both = frozenset({"a", "b"})
    assert (
        prov.create_volume(
            _req("one", MiB, allowed_nodes=both, preferred_nodes=("b", "a")), deadline=dl()
        ).node
        == "b"
    )
    # a preferred node outside the requisite is skipped
    assert (
        prov.create_volume(
            _req("two", MiB, allowed_nodes=both, preferred_nodes=("c", "a")), deadline=dl()
        ).node
        == "a"
    )
    assert prov.create_volume(_req("three", MiB, allowed_nodes=frozenset({"c"})), deadline=dl()).node == "c"
    with pytest.raises(errors.InvalidArgument):
        prov.create_volume(_req("four", MiB), deadline=dl())
    assert sorted(cluster.nodes["b"].devices) == ["v-one"]


def test_clones_and_snapshots_follow_their_source_and_capacity_is_per_node() -> None:
    prov, _ = _prov(a=1 * model.GiB, b=4 * model.GiB)
    vol = prov.create_volume(_req("src", MiB, allowed_nodes=frozenset({"b"})), deadline=dl())
    snap = prov.create_snapshot("snap", vol.name, deadline=dl())
    assert snap.node == "b"
    source = provisioner.ContentSource(kind=provisioner.naming.IdKind.SNAPSHOT, id=snap.name)
    restored = prov.create_volume(
        _req("restored", 2 * MiB, source=source, allowed_nodes=frozenset({"a", "b"}), preferred_nodes=("a",)),
        deadline=dl(),
    )
    assert restored.node == "b"
    with pytest.raises(errors.ResourceExhausted):  # the requisite excludes the source's node
        prov.create_volume(_req("nowhere", MiB, source=source, allowed_nodes=frozenset({"a"})), deadline=dl())
    cap_a = prov.capacity(node_id="a", deadline=dl())
    cap_b = prov.capacity(node_id="b", deadline=dl())
    assert cap_a.maximum_volume_bytes == 10 * model.GiB
    assert cap_b.maximum_volume_bytes == 40 * model.GiB - 3 * MiB
    assert prov.capacity(node_id=None, deadline=dl()).available_bytes == 0
    # overprovisioning is the node's own
    with pytest.raises(errors.ResourceExhausted):
        prov.create_volume(_req("big", 11 * model.GiB, allowed_nodes=frozenset({"a"})), deadline=dl())
    assert (
        prov.create_volume(_req("big", 11 * model.GiB, allowed_nodes=frozenset({"b"})), deadline=dl()).node
        == "b"
    )


def test_provisioner_needs_one_node_or_many() -> None:
    with pytest.raises(errors.Internal):
        provisioner.Provisioner(
            engine=FakeEngine(), settings=provisioner.Settings(node_id=None, block_size=4096)
        )


def test_volume_health_does_not_blame_volumes_for_an_api_server_that_does_not_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """In Kubernetes mode the controller reads a node's pool from its ThinPool object: UNAVAILABLE
    there is the API server not answering (the client's translation of a refused connection or a
    5xx), which says nothing about the volumes. Reported as their health, every volume on the node
    would be INACCESSIBLE ("PoolUnavailable") to a health monitor for the length of an API blip."""
    prov, cluster = _prov(a=model.GiB, b=model.GiB)
    on_a = prov.create_volume(_req("one", MiB, allowed_nodes=frozenset({"a"})), deadline=dl())
    prov.create_volume(_req("two", MiB, allowed_nodes=frozenset({"b"})), deadline=dl())

    def unanswered(*, deadline: deadline_mod.Deadline) -> model.PoolStatus:
        raise errors.Unavailable("list ThinPool: connection refused")

    monkeypatch.setattr(cluster.nodes["a"], "status", unanswered)
    with pytest.raises(errors.Unavailable):
        prov.volume_health(on_a.name, deadline=dl())
    with pytest.raises(errors.Unavailable):
        prov.list_volume_health(max_entries=0, token="", deadline=dl())


# ---- a node whose agent stopped reporting (fake clock over the CR engine) ------------------------

T0 = "2026-01-01T00:00:00Z"
T0_UNIX = 1767225600.0


def test_the_refresh_period_round_trips_and_old_statuses_read_as_30_s() -> None:
    st = res.PoolStatus(healthy=True, mode="rw", last_updated=T0, refresh_seconds=2.5)
    back = res.PoolStatus.from_dict(json.loads(json.dumps(st.to_dict())))
    assert back == st and back.period == 2.5 and back.updated_at() == T0_UNIX
    old = st.to_dict()
    del old["refreshSeconds"]  # written by an agent from before the field
    assert res.PoolStatus.from_dict(old).period == res.LEGACY_REFRESH_SECONDS == agent.REFRESH_SECONDS
    assert res.PoolStatus().updated_at() is None
    with pytest.raises(errors.Internal):
        res.PoolStatus.from_dict({"refreshSeconds": "often"})


@pytest.mark.parametrize(
    ("refresh", "age", "silent"),
    [
        (30.0, 0.0, False),
        (30.0, 100.0, False),  # 3 x 30 + 10: a node late by up to three periods is still trusted
        (30.0, 100.5, True),
        (0.0, 100.5, True),  # no refreshSeconds: the old agents' 30 s
        (0.0, 99.0, False),
        (1.0, 13.0, False),
        (1.0, 14.0, True),
        (1.0, -50.0, False),  # the node's clock ahead of the controller's: fresh, never negative
    ],
)
def test_silence_is_three_periods_and_the_skew_margin(refresh: float, age: float, silent: bool) -> None:
    st = res.PoolStatus(last_updated=T0, refresh_seconds=refresh)
    got = crengine.silence(st, now=T0_UNIX + age, skew_seconds=10.0)
    assert got == (age if silent else None)


def test_a_status_never_written_is_not_silence() -> None:
    assert crengine.silence(res.PoolStatus(), now=T0_UNIX + 1e6) is None


class _OneNodeApi:
    """What CrEngine reads of one node (its ThinPool, its ThinVolumes), and the deletes it asks for;
    a create fails the test: nothing may be made on a silent node."""

    def __init__(self, pool: res.ThinPool, *volumes: res.ThinVolume) -> None:
        self.pool = pool
        self.volumes = {v.name: v for v in volumes}
        self.deleted: list[tuple[str, str, str]] = []

    def list(self, cls: type[Any], *, deadline: deadline_mod.Deadline, node: str | None = None) -> Any:
        objs = {res.ThinPool: [self.pool], res.ThinVolume: list(self.volumes.values())}.get(cls, [])
        return [o for o in objs if node in (None, o.spec.node_name)], ""

    def find(self, cls: type[Any], name: str, *, deadline: deadline_mod.Deadline) -> Any:
        return self.volumes.get(name) if cls is res.ThinVolume else None

    def create(self, obj: Any, *, deadline: deadline_mod.Deadline) -> Any:
        raise AssertionError(f"{obj.name} was created on a silent node")

    def delete(
        self, cls: type[Any], name: str, *, deadline: deadline_mod.Deadline, uid: str, resource_version: str
    ) -> None:
        self.deleted.append((name, uid, resource_version))
        del self.volumes[name]


def test_a_silent_node_has_no_capacity_refuses_creates_and_its_volumes_are_unavailable() -> None:
    pool = res.ThinPool(
        meta=res.Meta(name="n1.p"),
        spec=res.PoolSpec(node_name="n1", pool="p"),
        status=res.PoolStatus(
            healthy=True,
            mode="rw",
            data_total_bytes=model.GiB,
            metadata_total_bytes=64 * MiB,
            last_updated=T0,
            refresh_seconds=5.0,
        ),
    )
    vol = res.ThinVolume(
        meta=res.Meta(name="v-pvc-old", generation=1, finalizers=(res.FINALIZER,)),
        spec=res.VolumeSpec(node_name="n1", pool="p", size_bytes=64 * MiB),
        status=res.VolumeStatus(
            phase=res.Phase.READY, size_bytes=64 * MiB, device_id=1, observed_generation=1
        ),
    )
    now = [T0_UNIX + 24.0]  # 3 x 5 + 10 = 25 s: still fresh
    # made by a create just before the node went silent; its agent never took it up (no finalizer)
    pending = res.ThinVolume(
        meta=res.Meta(name="v-pvc-pending", generation=1, uid="u1", resource_version="42"),
        spec=res.VolumeSpec(node_name="n1", pool="p", size_bytes=MiB),
    )
    api = _OneNodeApi(pool, vol, pending)
    cr = crengine.CrEngine(api, skew_seconds=10.0, clock=lambda: now[0])  # type: ignore[arg-type]
    prov = provisioner.Provisioner(
        engine=cr, settings=provisioner.Settings(node_id=None, block_size=64 * 1024), nodes=cr.on
    )
    assert prov.capacity(node_id="n1", deadline=dl()).available_bytes > 0
    assert prov.volume_health(vol.name, deadline=dl()).issues == ()

    now[0] = T0_UNIX + 26.0
    assert prov.capacity(node_id="n1", deadline=dl()) == provisioner.Capacity(0, 0)
    with pytest.raises(errors.NodeSilent) as exc:
        prov.create_volume(_req("new", MiB, allowed_nodes=frozenset({"n1"})), deadline=dl())
    assert exc.value.code == "RESOURCE_EXHAUSTED"
    assert exc.value.message.startswith(
        "node agent has not reported for 26 s on node 'n1' (bound 25 s: 3 x its 5 s period + 10 s skew)"
    )
    with pytest.raises(errors.NodeSilent):  # a grow there too
        prov.expand_volume(vol.name, provisioner.CapacityRange(128 * MiB), deadline=dl())
    # the retry of a create whose CR is there already fails fast too; a CR the agent has taken up
    # stays for it, one it never took up is withdrawn (that version only), so the next retry may go
    # to another node
    for name in ("v-pvc-old", "v-pvc-pending"):
        with pytest.raises(errors.NodeSilent):
            cr.on("n1").create_volume(name, MiB, deadline=dl())
    assert api.deleted == [("v-pvc-pending", "u1", "42")]
    (issue,) = prov.volume_health(vol.name, deadline=dl()).issues
    assert issue.reason == "PoolUnavailable" and "not reported for 26 s" in issue.message
    listed = prov.list_volume_health(max_entries=0, token="", deadline=dl())
    assert [h.volume.name for h in listed.entries] == [vol.name]


class _RacingApi(_OneNodeApi):
    """As _OneNodeApi; a delete may lose to the agent taking the object up (Conflict)."""

    def __init__(self, pool: res.ThinPool, *volumes: res.ThinVolume, conflict: bool = False) -> None:
        super().__init__(pool, *volumes)
        self.conflict = conflict

    def get(self, cls: type[Any], name: str, *, deadline: deadline_mod.Deadline) -> Any:
        return self.volumes[name]

    def delete(
        self, cls: type[Any], name: str, *, deadline: deadline_mod.Deadline, uid: str, resource_version: str
    ) -> None:
        if self.conflict:
            raise client_mod.Conflict(f"{name}: the agent took it up meanwhile")
        super().delete(cls, name, deadline=deadline, uid=uid, resource_version=resource_version)


def _silent_pool() -> res.ThinPool:
    return res.ThinPool(
        meta=res.Meta(name="n1.p"),
        spec=res.PoolSpec(node_name="n1", pool="p"),
        status=res.PoolStatus(healthy=True, mode="rw", last_updated=T0, refresh_seconds=5.0),
    )


def _pending(name: str, *, taken_up: bool, source: res.Source | None = None) -> res.ThinVolume:
    return res.ThinVolume(
        meta=res.Meta(
            name=name,
            generation=1,
            uid="u-" + name,
            resource_version="7",
            finalizers=(res.FINALIZER,) if taken_up else (),
        ),
        spec=res.VolumeSpec(node_name="n1", pool="p", size_bytes=MiB, source=source),
    )


def test_a_create_the_silent_node_took_up_is_not_refused_as_final() -> None:
    """RESOURCE_EXHAUSTED with a selected node makes the external-provisioner reschedule the claim and
    stop calling CreateVolume: it may only be said when nothing continues in the background. A CR the
    agent took up (its finalizer: the device may exist, or be made when the agent is back) is such a
    create: if the claim were then deleted, no one would ever delete that CR and its device. So the
    retry is ABORTED (pending, retried), and the CR stays."""
    now = T0_UNIX + 60.0  # 3 x 5 + 10 = 25 s: silent
    taken = _pending("v-pvc-taken", taken_up=True)
    api = _RacingApi(_silent_pool(), taken)
    cr = crengine.CrEngine(api, skew_seconds=10.0, clock=lambda: now)  # type: ignore[arg-type]
    with pytest.raises(errors.CsiThinError) as exc:
        cr.on("n1").create_volume("v-pvc-taken", MiB, deadline=dl())
    assert exc.value.code == "ABORTED" and api.deleted == []

    # one the agent takes up between the controller's read and its delete: the same
    raced = _pending("v-pvc-raced", taken_up=False)
    api = _RacingApi(_silent_pool(), raced, conflict=True)
    cr = crengine.CrEngine(api, skew_seconds=10.0, clock=lambda: now)  # type: ignore[arg-type]
    with pytest.raises(errors.CsiThinError) as exc:
        cr.on("n1").create_volume("v-pvc-raced", MiB, deadline=dl())
    assert exc.value.code == "ABORTED" and "v-pvc-raced" in api.volumes


def test_a_clone_refused_on_a_silent_node_withdraws_what_its_agent_never_took_up() -> None:
    """A leftover clone CR the agent never took up would be taken up when it comes back (a device no
    claim owns, once the refused claim is gone): withdrawn like a create's."""
    now = T0_UNIX + 60.0
    src = res.ThinVolume(
        meta=res.Meta(name="v-src", generation=1, finalizers=(res.FINALIZER,)),
        spec=res.VolumeSpec(node_name="n1", pool="p", size_bytes=MiB),
        status=res.VolumeStatus(phase=res.Phase.READY, size_bytes=MiB, device_id=1, observed_generation=1),
    )
    left = _pending("v-pvc-clone", taken_up=False, source=res.Source(volume="v-src"))
    api = _RacingApi(_silent_pool(), src, left)
    cr = crengine.CrEngine(api, skew_seconds=10.0, clock=lambda: now)  # type: ignore[arg-type]
    with pytest.raises(errors.NodeSilent):
        cr.clone("v-pvc-clone", "v-src", MiB, deadline=dl())
    assert api.deleted == [("v-pvc-clone", "u-v-pvc-clone", "7")]


class _VolumesApi:
    """ThinVolumes to read; any write fails the test."""

    def __init__(self, *volumes: res.ThinVolume) -> None:
        self.volumes = {v.name: v for v in volumes}

    def get(self, cls: type[Any], name: str, *, deadline: deadline_mod.Deadline) -> Any:
        if cls is not res.ThinVolume or name not in self.volumes:
            raise errors.NotFound(f"{name} not found")
        return self.volumes[name]

    def find(self, cls: type[Any], name: str, *, deadline: deadline_mod.Deadline) -> Any:
        return None

    def create(self, obj: Any, *, deadline: deadline_mod.Deadline) -> Any:
        raise AssertionError(f"{obj.kind.value} {obj.name} was written")


def test_a_group_across_nodes_is_refused_before_anything_is_written() -> None:
    def vol(name: str, node: str) -> res.ThinVolume:
        return res.ThinVolume(meta=res.Meta(name=name), spec=res.VolumeSpec(node, "p", 64 * MiB))

    api = _VolumesApi(vol("v-a", "n1"), vol("v-b", "n2"), vol("v-c", "n1"))
    cr = crengine.CrEngine(api)  # type: ignore[arg-type]
    with pytest.raises(errors.FailedPrecondition, match="different nodes") as info:
        cr.create_group_snapshot("g-1", [("s-1", "v-a"), ("s-2", "v-b"), ("s-3", "v-c")], deadline=dl())
    assert "v-a on n1" in info.value.message and "v-b on n2" in info.value.message
    with pytest.raises(errors.NotFound):
        cr.create_group_snapshot("g-1", [("s-1", "v-a"), ("s-2", "v-gone")], deadline=dl())


def test_a_group_larger_than_its_object_allows_is_refused_before_anything_is_written() -> None:
    """The ThinGroupSnapshot CRD holds at most MAX_GROUP_MEMBERS members: a bigger group must be
    refused before its member ThinSnapshots are written (else they stay forever: no group object
    ever names them, and the failed create leaves no handle for a delete)."""
    crd = pathlib.Path(__file__).parents[2] / "charts/csi-thin/crds/thingroupsnapshots.yaml"
    schema = yaml.safe_load(crd.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert schema["properties"]["spec"]["properties"]["members"]["maxItems"] == res.MAX_GROUP_MEMBERS
    n = res.MAX_GROUP_MEMBERS + 1
    spec = res.VolumeSpec("n1", "p", MiB)
    vols = [res.ThinVolume(meta=res.Meta(name=f"v-{i}"), spec=spec) for i in range(n)]
    cr = crengine.CrEngine(_VolumesApi(*vols))  # type: ignore[arg-type]
    with pytest.raises(errors.InvalidArgument, match=f"{n} volumes"):
        cr.create_group_snapshot("g-1", [(f"s-{i}", f"v-{i}") for i in range(n)], deadline=dl())


class _GroupWaitFailsApi(_VolumesApi):
    """Writes the members and the group; then every read of the group is refused (an API server
    error while the controller waits, not the node's verdict). Records deletes."""

    def __init__(self, *volumes: res.ThinVolume) -> None:
        super().__init__(*volumes)
        self.made: dict[str, Any] = {}
        self.deleted: list[str] = []

    def create(self, obj: Any, *, deadline: deadline_mod.Deadline) -> Any:
        made = dataclasses.replace(
            obj, meta=dataclasses.replace(obj.meta, uid=f"u-{obj.name}", resource_version="1")
        )
        self.made[obj.name] = made
        return made

    def find(self, cls: type[Any], name: str, *, deadline: deadline_mod.Deadline) -> Any:
        if cls is res.ThinGroupSnapshot and name in self.made:
            raise client_mod.Forbidden(f"get thingroupsnapshots {name}: refused")
        return self.made.get(name)

    def delete(self, cls: type[Any], name: str, *, deadline: deadline_mod.Deadline, **_: Any) -> None:
        self.deleted.append(name)


def test_a_group_whose_wait_fails_keeps_its_members() -> None:
    """Only the node's verdict (the group Failed, and withdrawn) takes the members away: after an
    API server error during the wait the group object lives on, and without its members its node
    could never cut it (it waits for them) nor a retry find them."""
    spec = res.VolumeSpec("n1", "p", MiB)
    api = _GroupWaitFailsApi(*(res.ThinVolume(meta=res.Meta(name=v), spec=spec) for v in ("v-a", "v-b")))
    cr = crengine.CrEngine(api)  # type: ignore[arg-type]
    with pytest.raises(client_mod.Forbidden):
        cr.create_group_snapshot("g-1", [("s-1", "v-a"), ("s-2", "v-b")], deadline=dl())
    assert sorted(api.made) == ["g-1", "s-1", "s-2"]
    assert api.deleted == []


class _GroupFailsApi(_GroupWaitFailsApi):
    """The node's verdict: the group Failed (RESOURCE_EXHAUSTED); a delete removes an object."""

    def find(self, cls: type[Any], name: str, *, deadline: deadline_mod.Deadline) -> Any:
        got = self.made.get(name)
        if cls is res.ThinGroupSnapshot and got is not None:
            failed = res.GroupStatus(phase=res.Phase.FAILED, code="RESOURCE_EXHAUSTED", message="full")
            return dataclasses.replace(got, status=failed)
        return got

    def delete(self, cls: type[Any], name: str, *, deadline: deadline_mod.Deadline, **_: Any) -> None:
        self.deleted.append(name)
        self.made.pop(name, None)


def test_a_failed_group_takes_its_members_with_it() -> None:
    spec = res.VolumeSpec("n1", "p", MiB)
    api = _GroupFailsApi(*(res.ThinVolume(meta=res.Meta(name=v), spec=spec) for v in ("v-a", "v-b")))
    cr = crengine.CrEngine(api)  # type: ignore[arg-type]
    with pytest.raises(errors.ResourceExhausted):
        cr.create_group_snapshot("g-1", [("s-1", "v-a"), ("s-2", "v-b")], deadline=dl())
    assert api.deleted == ["g-1", "s-1", "s-2"] and api.made == {}
