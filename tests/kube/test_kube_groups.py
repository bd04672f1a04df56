"""Volume group snapshots in Kubernetes mode, with the real processes: the controller's
GroupController writes one ThinSnapshot per member and then ONE ThinGroupSnapshot; the node agent
cuts every member in one engine mutation. Created, found again (idempotent), each member restored
with its data like any snapshot, refused alone (DeleteSnapshot), deleted with its group; volumes on
two nodes refused before anything is written; and the node agent SIGKILLed in the middle of the
group's mutation (one origin mounted and frozen at the kill), restarted: the retried call completes,
the mounted filesystem takes writes, and the CRs and the pool agree exactly."""

from __future__ import annotations

import pathlib
import signal
import subprocess
import time

import grpc
import kubernetes
import pytest

from csi_thin.csi.pb import csi_pb2, csi_pb2_grpc
from tests.kube.conftest import Cluster, G, MiB, V
from tests.kube.test_kube_faults import _restart
from tests.kube.test_kube_mode import CAP, _read, _write, code_of, create_req


def _groups(c: Cluster) -> csi_pb2_grpc.GroupControllerStub:
    ch = grpc.insecure_channel(f"unix://{c.controller_proc.socket}")
    c.channels.append(ch)
    return csi_pb2_grpc.GroupControllerStub(ch)


def _group_req(name: str, *vols: csi_pb2.Volume) -> csi_pb2.CreateVolumeGroupSnapshotRequest:
    return csi_pb2.CreateVolumeGroupSnapshotRequest(name=name, source_volume_ids=[v.volume_id for v in vols])


def _restore(name: str, snap: csi_pb2.Snapshot, node: str) -> csi_pb2.CreateVolumeRequest:
    src = csi_pb2.VolumeContentSource(
        snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=snap.snapshot_id)
    )
    return create_req(name, 64 * MiB, requisite=[node], preferred=[node], source=src)


def _agree(c: Cluster, key: str) -> None:
    """The node's ThinVolumes and ThinSnapshots are exactly its pool's records, every one Ready; its
    ThinGroupSnapshots are Ready and name only snapshots that are there; no orphan, nothing lost."""
    node = c.nodes[key].name
    crs = c.crs("thinvolumes", node) + c.crs("thinsnapshots", node)
    assert c.devices(key) == sorted(cr["metadata"]["name"] for cr in crs)
    for cr in crs:
        assert cr["status"]["phase"] == "Ready", cr
    snaps = {cr["metadata"]["name"]: cr for cr in c.crs("thinsnapshots", node)}
    for g in c.crs("thingroupsnapshots", node):
        assert g["status"]["phase"] == "Ready" and g["status"]["readyToUse"], g
        for m in g["spec"]["members"]:
            assert snaps[m["snapshot"]]["spec"]["group"] == g["metadata"]["name"]
            assert snaps[m["snapshot"]]["spec"]["sourceVolume"] == m["sourceVolume"]
    status = c.pool(key)["status"]
    assert status["orphans"] == [] and status["lost"] == []


def test_group_snapshot_lifecycle(cluster: Cluster, tmp_path: pathlib.Path) -> None:
    c = cluster
    a = c.nodes["a"].name
    ctl, grp = c.controller(), _groups(c)
    caps = grp.GroupControllerGetCapabilities(csi_pb2.GroupControllerGetCapabilitiesRequest())
    kinds = [cap.rpc.type for cap in caps.capabilities]
    assert kinds == [csi_pb2.GroupControllerServiceCapability.RPC.CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT]
    data = ctl.CreateVolume(create_req("pvc-data", 64 * MiB, requisite=[a], preferred=[a])).volume
    wal = ctl.CreateVolume(create_req("pvc-wal", 64 * MiB, requisite=[a], preferred=[a])).volume
    _write(c, "a", data, tmp_path / "wd", "the data")
    _write(c, "a", wal, tmp_path / "ww", "the wal")

    gs = grp.CreateVolumeGroupSnapshot(_group_req("vgs-1", data, wal)).group_snapshot
    assert gs.ready_to_use and len(gs.snapshots) == 2
    assert sorted(s.source_volume_id for s in gs.snapshots) == sorted([data.volume_id, wal.volume_id])
    for s in gs.snapshots:
        assert s.ready_to_use and s.group_snapshot_id == gs.group_snapshot_id and s.size_bytes == 64 * MiB
    # the objects: one group naming both members, each member an ordinary ThinSnapshot on node a
    tg = c.cr("thingroupsnapshots", gs.group_snapshot_id)
    assert tg is not None and tg["spec"]["nodeName"] == a
    assert tg["metadata"]["finalizers"] == ["csi-thin.io/device"]
    assert sorted(m["snapshot"] for m in tg["spec"]["members"]) == sorted(s.snapshot_id for s in gs.snapshots)
    _agree(c, "a")

    # idempotent: the same call is the same group; the name with other volumes is ALREADY_EXISTS
    again = grp.CreateVolumeGroupSnapshot(_group_req("vgs-1", data, wal)).group_snapshot
    assert again.group_snapshot_id == gs.group_snapshot_id and again.creation_time == gs.creation_time
    assert sorted(s.snapshot_id for s in again.snapshots) == sorted(s.snapshot_id for s in gs.snapshots)
    assert code_of(lambda: grp.CreateVolumeGroupSnapshot(_group_req("vgs-1", data))) == (
        grpc.StatusCode.ALREADY_EXISTS
    )
    got = grp.GetVolumeGroupSnapshot(
        csi_pb2.GetVolumeGroupSnapshotRequest(group_snapshot_id=gs.group_snapshot_id)
    ).group_snapshot
    assert sorted(s.snapshot_id for s in got.snapshots) == sorted(s.snapshot_id for s in gs.snapshots)

    # members are ordinary snapshots: listed, restored with their data; never deleted alone
    listed = ctl.ListSnapshots(csi_pb2.ListSnapshotsRequest(source_volume_id=wal.volume_id)).entries
    assert [e.snapshot.group_snapshot_id for e in listed] == [gs.group_snapshot_id]
    by_source = {s.source_volume_id: s for s in gs.snapshots}
    for vol, text in ((data, "the data"), (wal, "the wal")):
        restored = ctl.CreateVolume(_restore(f"r-{vol.volume_id[2:]}", by_source[vol.volume_id], a)).volume
        assert _read(c, "a", restored, tmp_path / f"r-{vol.volume_id}") == text
        ctl.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=restored.volume_id))
    member = gs.snapshots[0].snapshot_id
    assert code_of(lambda: ctl.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=member))) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    assert c.cr("thinsnapshots", member) is not None
    # nor by deleting its object: its node keeps the device (and the finalizer) while the group is
    # there, and says so
    c.api.delete_cluster_custom_object(G, V, "thinsnapshots", member)
    events = kubernetes.client.EventsV1Api(c.env.api_client())
    end = time.monotonic() + 60
    while not [
        e
        for e in events.list_namespaced_event("default").items
        if e.regarding.name == member and e.reason == "DeleteBlocked"
    ]:
        assert time.monotonic() < end, "no DeleteBlocked event for a member deleted alone"
        time.sleep(0.2)
    ts = c.cr("thinsnapshots", member)
    assert ts is not None and ts["metadata"].get("deletionTimestamp") and member in c.devices("a")

    # the group goes with every member: objects and devices; a second delete is done already
    req = csi_pb2.DeleteVolumeGroupSnapshotRequest(
        group_snapshot_id=gs.group_snapshot_id, snapshot_ids=[s.snapshot_id for s in gs.snapshots]
    )
    grp.DeleteVolumeGroupSnapshot(req)
    assert c.cr("thingroupsnapshots", gs.group_snapshot_id) is None
    assert all(c.cr("thinsnapshots", s.snapshot_id) is None for s in gs.snapshots)
    assert c.devices("a") == sorted([data.volume_id, wal.volume_id])
    grp.DeleteVolumeGroupSnapshot(req)
    assert code_of(
        lambda: grp.GetVolumeGroupSnapshot(
            csi_pb2.GetVolumeGroupSnapshotRequest(group_snapshot_id=gs.group_snapshot_id)
        )
    ) == (grpc.StatusCode.NOT_FOUND)
    _agree(c, "a")


def test_group_across_nodes_is_refused_before_anything_is_written(cluster: Cluster) -> None:
    c = cluster
    a, b = c.nodes["a"].name, c.nodes["b"].name
    ctl, grp = c.controller(), _groups(c)
    va = ctl.CreateVolume(create_req("pvc-x", 64 * MiB, requisite=[a], preferred=[a])).volume
    vb = ctl.CreateVolume(create_req("pvc-y", 64 * MiB, requisite=[b], preferred=[b])).volume
    with pytest.raises(grpc.RpcError) as info:
        grp.CreateVolumeGroupSnapshot(_group_req("vgs-2", va, vb))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "different nodes" in str(info.value.details()), info.value.details()
    for key, node in (("a", a), ("b", b)):
        assert c.crs("thingroupsnapshots", node) == [] and c.crs("thinsnapshots", node) == []
        _agree(c, key)


@pytest.mark.parametrize(
    "point",
    [
        "reflink:quiesce/frozen",  # the mounted origin frozen, nothing cut yet: undone, thawed
        "create_group_snapshot/create_snap:done",  # every member cut, origins held: undone, let go
        "create_group_snapshot/fence:done",  # fenced, not committed: finished
    ],
)
def test_node_agent_killed_mid_group(cluster: Cluster, tmp_path: pathlib.Path, point: str) -> None:
    c = cluster
    a = c.nodes["a"].name
    ctl, grp = c.controller(), _groups(c)
    data = ctl.CreateVolume(create_req("pvc-d", 64 * MiB, requisite=[a], preferred=[a])).volume
    wal = ctl.CreateVolume(create_req("pvc-w", 64 * MiB, requisite=[a], preferred=[a])).volume
    _write(c, "a", wal, tmp_path / "ww", "the wal")
    # the data volume stays mounted (as under a running pod): the group freezes its filesystem
    stage, target = tmp_path / "stage", tmp_path / "target"
    c.node("a").stage(data, CAP, stage)
    c.node("a").publish(data, CAP, stage, target)
    (target / "hello").write_text("the data")
    _restart(c, "a", kill_at=point)

    def call() -> csi_pb2.VolumeGroupSnapshot:
        return grp.CreateVolumeGroupSnapshot(_group_req("vgs-k", data, wal), timeout=10).group_snapshot

    assert code_of(call) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert c.nodes["a"].proc.wait_dead() == -signal.SIGKILL, f"the agent did not reach {point}"
    c.nodes["a"].proc.start()
    # the filesystem the dead agent held frozen takes writes again (a child with a deadline: a
    # write into a frozen filesystem would block this test forever)
    subprocess.run(
        ["sh", "-c", f"echo more >> {target / 'hello'} && sync -f {target / 'hello'}"], check=True, timeout=30
    )
    gs = call()  # the snapshotter's retry completes on the same objects
    assert gs.ready_to_use and len(gs.snapshots) == 2
    _agree(c, "a")
    assert len(c.crs("thingroupsnapshots", a)) == 1
    c.node("a").release(data.volume_id, stage, target)
    by_source = {s.source_volume_id: s for s in gs.snapshots}
    restored = ctl.CreateVolume(_restore("r-wal", by_source[wal.volume_id], a)).volume
    assert _read(c, "a", restored, tmp_path / "rw") == "the wal"
    # the restarted agent cut the group at start-up (its object was there), before the write above:
    # the member holds what the mounted filesystem held then, unsynced as it was (the freeze syncs)
    restored = ctl.CreateVolume(_restore("r-data", by_source[data.volume_id], a)).volume
    assert _read(c, "a", restored, tmp_path / "rd") == "the data"


def test_group_delete_marks_no_member_lost(cluster: Cluster) -> None:
    """Deleting a group deletes its members' devices first (in one mutation), then their objects:
    in between, a member whose device went with its group is not a lost device (no DeviceLost
    Warning, no Lost status: an alert for every group deleted)."""
    c = cluster
    a = c.nodes["a"].name
    ctl, grp = c.controller(), _groups(c)
    data = ctl.CreateVolume(create_req("pvc-ld", 64 * MiB, requisite=[a], preferred=[a])).volume
    wal = ctl.CreateVolume(create_req("pvc-lw", 64 * MiB, requisite=[a], preferred=[a])).volume
    gs = grp.CreateVolumeGroupSnapshot(_group_req("vgs-l", data, wal)).group_snapshot
    members = sorted(s.snapshot_id for s in gs.snapshots)
    # the controller's first step of a delete: the group object, and the node deletes the devices
    c.api.delete_cluster_custom_object(G, V, "thingroupsnapshots", gs.group_snapshot_id)
    end = time.monotonic() + 60
    while c.cr("thingroupsnapshots", gs.group_snapshot_id) is not None:
        assert time.monotonic() < end, "the group object did not go"
        time.sleep(0.1)
    assert c.devices("a") == sorted([data.volume_id, wal.volume_id])
    # a later create on the node: its agent (one reconcile at a time, in order) has handled the
    # members it queued when the group went
    ctl.CreateVolume(create_req("pvc-sync", 64 * MiB, requisite=[a], preferred=[a]))
    for m in members:
        ts = c.cr("thinsnapshots", m)
        assert ts is not None and ts["status"]["phase"] != "Lost", ts
    events = kubernetes.client.EventsV1Api(c.env.api_client()).list_namespaced_event("default").items
    lost = [e.regarding.name for e in events if e.reason == "DeviceLost" and e.regarding.name in members]
    assert lost == [], lost
    grp.DeleteVolumeGroupSnapshot(
        csi_pb2.DeleteVolumeGroupSnapshotRequest(group_snapshot_id=gs.group_snapshot_id, snapshot_ids=members)
    )
    assert all(c.cr("thinsnapshots", m) is None for m in members)
