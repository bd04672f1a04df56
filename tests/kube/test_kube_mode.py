"""Kubernetes mode end to end on one real API server: a controller process and two node agents
(two pools, two node names), driven by CSI calls as external-provisioner, -snapshotter and -resizer
send them. Volumes land on the node the topology asks for, snapshots/restores/clones on their
source's node, sizes grow, capacity is per node from its ThinPool, and deletes remove CR and device."""

from __future__ import annotations

import pathlib

import grpc
import pytest

from csi_thin.csi.pb import csi_pb2
from tests.kube.conftest import TOPOLOGY_KEY, Cluster, GiB, MiB

Mode = csi_pb2.VolumeCapability.AccessMode
CAP = csi_pb2.VolumeCapability(
    mount=csi_pb2.VolumeCapability.MountVolume(fs_type="ext4"), access_mode=Mode(mode=Mode.SINGLE_NODE_WRITER)
)


def topo(*nodes: str) -> list[csi_pb2.Topology]:
    return [csi_pb2.Topology(segments={TOPOLOGY_KEY: n}) for n in nodes]


def create_req(
    name: str,
    size: int,
    *,
    requisite: list[str],
    preferred: list[str],
    source: csi_pb2.VolumeContentSource | None = None,
) -> csi_pb2.CreateVolumeRequest:
    return csi_pb2.CreateVolumeRequest(
        name=name,
        capacity_range=csi_pb2.CapacityRange(required_bytes=size),
        volume_capabilities=[CAP],
        accessibility_requirements=csi_pb2.TopologyRequirement(
            requisite=topo(*requisite), preferred=topo(*preferred)
        ),
        volume_content_source=source,
    )


def node_of(vol: csi_pb2.Volume) -> str:
    (t,) = vol.accessible_topology
    return str(t.segments[TOPOLOGY_KEY])


def capacity(c: Cluster, node: str) -> csi_pb2.GetCapacityResponse:
    return c.controller().GetCapacity(
        csi_pb2.GetCapacityRequest(
            volume_capabilities=[CAP], accessible_topology=csi_pb2.Topology(segments={TOPOLOGY_KEY: node})
        )
    )


def code_of(fn: object) -> grpc.StatusCode:
    try:
        fn()  # type: ignore[operator]
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def _write(c: Cluster, key: str, vol: csi_pb2.Volume, where: pathlib.Path, text: str) -> None:
    d = c.node(key)
    stage, target = where / "stage", where / "target"
    d.stage(vol, CAP, stage)
    d.publish(vol, CAP, stage, target)
    (target / "hello").write_text(text)
    d.release(vol.volume_id, stage, target)


def _read(c: Cluster, key: str, vol: csi_pb2.Volume, where: pathlib.Path) -> str:
    d = c.node(key)
    stage, target = where / "stage", where / "target"
    d.stage(vol, CAP, stage)
    d.publish(vol, CAP, stage, target)
    text = (target / "hello").read_text()
    d.release(vol.volume_id, stage, target)
    return text


def test_two_nodes_lifecycle(cluster: Cluster, tmp_path: pathlib.Path) -> None:
    c = cluster
    a, b = c.nodes["a"].name, c.nodes["b"].name
    ctl = c.controller()

    # NodeGetInfo: the topology key names the node
    for key, name in (("a", a), ("b", b)):
        info = c.node(key).node.NodeGetInfo(csi_pb2.NodeGetInfoRequest())
        assert info.node_id == name
        assert dict(info.accessible_topology.segments) == {TOPOLOGY_KEY: name}

    # capacity per node, from each ThinPool (pools of 1 and 2 GiB)
    cap_a, cap_b = capacity(c, a), capacity(c, b)
    assert 0 < cap_a.available_capacity < cap_b.available_capacity
    assert cap_b.available_capacity > GiB
    st_a = c.pool("a")["status"]
    assert cap_a.maximum_volume_size.value == 10 * st_a["dataTotalBytes"] // MiB * MiB
    assert capacity(c, "no-such-node").available_capacity == 0

    # topology respected: preferred first, among the requisite
    va = ctl.CreateVolume(create_req("pvc-a", 64 * MiB, requisite=[a, b], preferred=[a, b])).volume
    vb = ctl.CreateVolume(create_req("pvc-b", 96 * MiB, requisite=[a, b], preferred=[b, a])).volume
    assert (node_of(va), node_of(vb)) == (a, b)
    tv = c.cr("thinvolumes", va.volume_id)
    assert tv is not None
    assert tv["spec"]["nodeName"] == a and tv["status"]["phase"] == "Ready" and tv["status"]["deviceId"] > 0
    assert tv["metadata"]["finalizers"] == ["csi-thin.io/device"]
    assert tv["status"]["observedGeneration"] == tv["metadata"]["generation"]
    assert c.devices("a") == [va.volume_id] and c.devices("b") == [vb.volume_id]
    assert capacity(c, a).available_capacity <= cap_a.available_capacity

    # idempotency: same request, same volume; another size under the name: ALREADY_EXISTS
    again = ctl.CreateVolume(create_req("pvc-a", 64 * MiB, requisite=[a, b], preferred=[a, b])).volume
    assert again.volume_id == va.volume_id and node_of(again) == a
    assert code_of(
        lambda: ctl.CreateVolume(create_req("pvc-a", 128 * MiB, requisite=[a], preferred=[a]))
    ) == (grpc.StatusCode.ALREADY_EXISTS)

    # data: written on node a, snapshot, restored larger (on a, whatever the request prefers)
    _write(c, "a", va, tmp_path / "w1", "from pvc-a")
    snap = ctl.CreateSnapshot(
        csi_pb2.CreateSnapshotRequest(name="snap-a", source_volume_id=va.volume_id)
    ).snapshot
    assert snap.ready_to_use and snap.size_bytes == 64 * MiB and snap.source_volume_id == va.volume_id
    ts = c.cr("thinsnapshots", snap.snapshot_id)
    assert ts is not None and ts["spec"]["nodeName"] == a and ts["status"]["readyToUse"]
    src = csi_pb2.VolumeContentSource(
        snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=snap.snapshot_id)
    )
    restored = ctl.CreateVolume(
        create_req("pvc-restored", 128 * MiB, requisite=[a, b], preferred=[b], source=src)
    ).volume
    assert node_of(restored) == a and restored.capacity_bytes == 128 * MiB
    assert restored.content_source.snapshot.snapshot_id == snap.snapshot_id
    assert _read(c, "a", restored, tmp_path / "r1") == "from pvc-a"
    # a restore whose requisite topology excludes the source's node cannot be placed
    assert (
        code_of(
            lambda: ctl.CreateVolume(
                create_req("pvc-nowhere", 64 * MiB, requisite=[b], preferred=[b], source=src)
            )
        )
        == grpc.StatusCode.RESOURCE_EXHAUSTED
    )

    # clone on node b
    vsrc = csi_pb2.VolumeContentSource(
        volume=csi_pb2.VolumeContentSource.VolumeSource(volume_id=vb.volume_id)
    )
    clone = ctl.CreateVolume(
        create_req("pvc-clone", 96 * MiB, requisite=[a, b], preferred=[a], source=vsrc)
    ).volume
    assert node_of(clone) == b
    assert c.devices("b") == sorted([vb.volume_id, clone.volume_id])

    # expand: spec raised, the node grows the device, status follows; mount volumes need the node too
    grown = ctl.ControllerExpandVolume(
        csi_pb2.ControllerExpandVolumeRequest(
            volume_id=va.volume_id,
            capacity_range=csi_pb2.CapacityRange(required_bytes=256 * MiB),
            volume_capability=CAP,
        )
    )
    assert grown.capacity_bytes == 256 * MiB and grown.node_expansion_required
    tv = c.cr("thinvolumes", va.volume_id)
    assert tv is not None and tv["status"]["sizeBytes"] == 256 * MiB and tv["metadata"]["generation"] == 2
    assert tv["status"]["observedGeneration"] == 2

    # reads from the CRs: get, paginated lists
    got = ctl.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(volume_id=va.volume_id))
    assert got.volume.capacity_bytes == 256 * MiB
    health = ctl.ControllerGetVolumeHealth(csi_pb2.ControllerGetVolumeHealthRequest(volume_id=va.volume_id))
    assert health.volume_health.volume_id == va.volume_id and not health.volume_health.health_statuses
    ids: list[str] = []
    token = ""
    while True:
        page = ctl.ListVolumes(csi_pb2.ListVolumesRequest(max_entries=2, starting_token=token))
        assert len(page.entries) <= 2
        ids += [
            e.volume.volume_id
            for e in page.entries
            if e.volume.volume_id.endswith(("pvc-a", "pvc-b", "pvc-restored", "pvc-clone"))
        ]
        token = page.next_token
        if not token:
            break
    assert sorted(ids) == sorted(v.volume_id for v in (va, vb, restored, clone))
    snaps = ctl.ListSnapshots(csi_pb2.ListSnapshotsRequest(source_volume_id=va.volume_id)).entries
    assert [s.snapshot.snapshot_id for s in snaps] == [snap.snapshot_id]

    # the ThinPool status follows the mutations
    st_a = c.pool("a")["status"]
    assert st_a["volumes"] == 2 and st_a["snapshots"] == 1 and st_a["health"] == "Healthy"
    assert st_a["provisionedBytes"] == (256 + 128 + 64) * MiB  # the snapshot counts: its blocks stay

    # deletes: CR and device gone; a second delete is fine
    for vid in (restored.volume_id, clone.volume_id, va.volume_id, vb.volume_id):
        ctl.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vid))
        assert c.cr("thinvolumes", vid) is None
        ctl.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vid))
    ctl.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    assert c.cr("thinsnapshots", snap.snapshot_id) is None
    assert c.devices("a") == [] and c.devices("b") == []


def test_a_node_full_is_resource_exhausted_and_the_retry_goes_elsewhere(cluster: Cluster) -> None:
    """Over node a's overprovisioning limit: RESOURCE_EXHAUSTED (the provisioner then reschedules);
    the retry under the same name, now preferring node b, lands on b."""
    c = cluster
    a, b = c.nodes["a"].name, c.nodes["b"].name
    ctl = c.controller()
    big = 12 * GiB  # over 10 x node a's 1 GiB pool, under node b's 20 GiB
    err = code_of(lambda: ctl.CreateVolume(create_req("pvc-big", big, requisite=[a, b], preferred=[a])))
    assert err == grpc.StatusCode.RESOURCE_EXHAUSTED
    vol = ctl.CreateVolume(create_req("pvc-big", big, requisite=[a, b], preferred=[b])).volume
    assert node_of(vol) == b
    ctl.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id))


@pytest.mark.parametrize("missing", ["no-topology"])
def test_a_volume_needs_a_node(cluster: Cluster, missing: str) -> None:
    ctl = cluster.controller()
    req = csi_pb2.CreateVolumeRequest(name="pvc-x", volume_capabilities=[CAP])
    assert code_of(lambda: ctl.CreateVolume(req)) == grpc.StatusCode.INVALID_ARGUMENT


def test_a_node_side_failure_is_status_and_an_event(cluster: Cluster) -> None:
    """A ThinVolume the node cannot make (its source snapshot does not exist there): status Failed
    with the gRPC code, observedGeneration, a Ready=False condition, and a Warning Event."""
    import kubernetes

    from csi_thin import deadline as deadline_mod
    from csi_thin.kube import client as client_mod
    from csi_thin.kube import resources as res
    from csi_thin.kube import watch

    c = cluster
    a = c.nodes["a"].name
    api = client_mod.Client(c.env.api_client())
    name = f"v-orphan-restore-{c.tag}"
    spec = res.VolumeSpec(node_name=a, pool="p", size_bytes=64 * MiB, source=res.Source(snapshot="s-missing"))
    api.create(res.ThinVolume(meta=res.Meta(name=name), spec=spec), deadline=deadline_mod.Deadline.after(10))
    got = watch.wait_for(
        api,
        res.ThinVolume,
        name,
        lambda o: o is not None and o.settled,
        deadline=deadline_mod.Deadline.after(60),
        what="the node's verdict",
    )
    assert got is not None and got.status.phase == res.Phase.FAILED
    assert got.status.code == "NOT_FOUND" and "s-missing" in got.status.message
    assert got.status.observed_generation == got.meta.generation
    assert [(cond.type, cond.status, cond.reason) for cond in got.status.conditions] == [
        ("Ready", "False", "NotFound")
    ]
    events = kubernetes.client.EventsV1Api(c.env.api_client()).list_namespaced_event("default")
    mine = [e for e in events.items if e.regarding.name == name]
    assert [(e.type, e.reason) for e in mine] == [("Warning", "CreateFailed")]
    assert "NOT_FOUND" in mine[0].note
    assert c.devices("a") == []
